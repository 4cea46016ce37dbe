/* How the console writes numbers: counts, bytes (binary units), durations, clock times.
 * Every function takes null or undefined and answers an en dash, so a missing value reads as
 * missing, never as 0. */
"use strict";

const Fmt = (() => {
  const DASH = "\u2013";
  const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

  /** A number with at most 3 significant digits (2 decimals at most), trailing zeros cut. */
  function short(v) {
    const a = Math.abs(v);
    const digits = a >= 100 ? 0 : a >= 10 ? 1 : 2;
    return String(Number(v.toFixed(digits)));
  }

  /** The binary unit that keeps ``max`` under 1024: {div, suffix}. */
  function byteScale(max) {
    let i = 0;
    let m = Math.abs(max || 0);
    while (m >= 1024 && i < BYTE_UNITS.length - 1) {
      m /= 1024;
      i += 1;
    }
    return { div: 1024 ** i, suffix: " " + BYTE_UNITS[i] };
  }

  function bytes(v) {
    if (v == null) return DASH;
    const s = byteScale(v);
    return short(v / s.div) + s.suffix;
  }

  function num(v) {
    if (v == null || Number.isNaN(v)) return DASH;
    const a = Math.abs(v);
    if (a >= 1e9) return short(v / 1e9) + "G";
    if (a >= 1e6) return short(v / 1e6) + "M";
    if (a >= 1e4) return short(v / 1e3) + "k";
    return Number.isInteger(v) ? v.toLocaleString("en-US") : short(v);
  }

  function ms(v) {
    if (v == null) return DASH;
    return Math.abs(v) >= 1000 ? short(v / 1000) + " s" : short(v) + " ms";
  }

  function seconds(v) {
    if (v == null) return DASH;
    if (v < 60) return short(v) + " s";
    if (v < 3600) return Math.floor(v / 60) + " min " + Math.round(v % 60) + " s";
    return Math.floor(v / 3600) + " h " + Math.round((v % 3600) / 60) + " min";
  }

  const pad = (n) => String(n).padStart(2, "0");

  /** Local clock time of unix seconds ``t``: HH:MM:SS (or HH:MM with ``minutes``). */
  function clock(t, minutes = false) {
    if (t == null) return DASH;
    const d = new Date(t * 1000);
    const hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
    return minutes ? hm : hm + ":" + pad(d.getSeconds());
  }

  /** "12 s ago", "3 min ago", ... for unix seconds ``t`` before ``now``. */
  function ago(t, now = Date.now() / 1000) {
    if (t == null) return DASH;
    return seconds(Math.max(0, Math.round(now - t))) + " ago";
  }

  /** A limit where 0 means unlimited. */
  function limit(v) {
    if (v == null) return DASH;
    return v === 0 ? "\u221e" : num(v);
  }

  return { DASH, short, byteScale, bytes, num, ms, seconds, clock, ago, limit };
})();
