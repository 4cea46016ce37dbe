/* What every chart shares: SVG and HTML element builders, round tick values, axis formats,
 * and redrawing a chart when its box changes width. */
"use strict";

const Svg = (() => {
  const NS = "http://www.w3.org/2000/svg";

  function el(tag, attrs = {}, parent = null, text = null) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function html(tag, cls, parent = null, text = null) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  /** Evenly spaced round ticks (1, 2, 2.5, 5 x 10^k) covering [lo, hi], about ``count``;
   * whole numbers only with ``integer`` (counts of things). */
  function niceTicks(lo, hi, count = 4, integer = false) {
    if (!(hi > lo)) hi = lo + 1;
    const raw = (hi - lo) / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const f = raw / mag;
    let step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag;
    if (integer) step = Math.max(1, step === 2.5 ? 2 : Math.round(step));
    const ticks = [];
    for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      ticks.push(Number(v.toPrecision(12)));
    }
    if (ticks[ticks.length - 1] < hi)
      ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
    return ticks;
  }

  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];

  function timeTicks(t0, t1, count) {
    const step = TIME_STEPS.find((s) => (t1 - t0) / s <= count) || 3600;
    const out = [];
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) out.push(t);
    return { ticks: out, step };
  }

  /** How the value axis is labelled: bytes get one binary unit for the whole axis. */
  function axisFormat(unit, max) {
    if (unit === "bytes") {
      const s = Fmt.byteScale(max);
      return { tick: (v) => Fmt.short(v / s.div) + s.suffix, value: Fmt.bytes };
    }
    if (unit === "ms") return { tick: Fmt.ms, value: Fmt.ms };
    const suffix = unit && unit !== "count" ? " " + unit : "";
    return { tick: Fmt.num, value: (v) => (v == null ? Fmt.DASH : Fmt.num(v) + suffix) };
  }

  const drawn = new Map(); // container -> width it was last drawn at
  const resizes = new ResizeObserver((entries) => {
    for (const entry of entries) {
      const box = entry.target;
      if (box.isConnected && box._chart && drawn.get(box) !== box.clientWidth) box._chart();
    }
  });

  function mount(box, draw) {
    box._chart = () => {
      drawn.set(box, box.clientWidth);
      draw();
    };
    box._chart();
    resizes.observe(box);
  }

  return { el, html, niceTicks, timeTicks, axisFormat, mount };
})();
