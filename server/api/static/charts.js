/* Hand-written SVG charts: time series (lines, areas, bars), stacked horizontal bars, sparklines.
 *
 * Every chart redraws from the options it was last given when its box is resized, starts its
 * value axis at zero unless told otherwise, leaves a gap where a value is null, and marks each
 * drawn series with data-series and data-points (the number of values drawn). */
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const MARGIN = { left: 58, right: 14, top: 12, bottom: 26 };

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

  /** Evenly spaced round ticks (1, 2, 2.5, 5 x 10^k) covering [lo, hi], about ``count``. */
  function niceTicks(lo, hi, count = 4) {
    if (!(hi > lo)) hi = lo + 1;
    const raw = (hi - lo) / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const f = raw / mag;
    const step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag;
    const ticks = [];
    for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      ticks.push(Number(v.toPrecision(12)));
    }
    if (ticks[ticks.length - 1] < hi) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
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

  /**
   * A time series chart in ``box``. ``opts``: x (unix seconds, or numbers with xKind
   * "number" and xLabel naming them in the tooltip), series [{key, label, color, values, area, bars}], unit ("bytes", "ms", a
   * unit name, or "count"), height, zero (default true), empty (text when nothing to draw).
   */
  function timeSeries(box, opts) {
    mount(box, () => drawSeries(box, opts));
  }

  function drawSeries(box, o) {
    box.replaceChildren();
    box.classList.add("chart-box");
    const W = Math.max(260, box.clientWidth || 0);
    const H = o.height || 190;
    const xs = o.x || [];
    const series = o.series.filter((s) => !s.hidden);
    const values = series.flatMap((s) => s.values.filter((v) => v != null));
    const legend = html("div", "legend", box);
    const fmt0 = axisFormat(o.unit, Math.max(0, ...values));
    const latest = (s) => [...s.values].reverse().find((v) => v != null);
    const legendValues = series.map((s) => {
      const item = html("span", "legend-item", legend);
      const sw = html("span", "swatch", item);
      sw.style.background = s.color;
      html("span", "legend-label", item, s.label);
      return html("span", "legend-value", item, fmt0.value(latest(s)));
    });
    const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart" }, box);
    if (!xs.length || !values.length) {
      el("text", { x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle" }, svg, o.empty || "No data yet");
      return;
    }
    const pw = W - MARGIN.left - MARGIN.right;
    const ph = H - MARGIN.top - MARGIN.bottom;
    let x0 = xs[0];
    let x1 = xs[xs.length - 1];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    const zero = o.zero !== false;
    const lo = zero ? Math.min(0, ...values) : Math.min(...values);
    const hiRaw = Math.max(...values);
    // ticks are round numbers in the axis's unit (MiB for bytes), so scale before choosing
    const div = o.unit === "bytes" ? Fmt.byteScale(hiRaw).div : 1;
    const flat = lo === hiRaw;
    const yt = niceTicks((flat && !zero ? lo - 1 : lo) / div, (flat ? lo + 1 : hiRaw) / div, 4).map((t) => t * div);
    const y0 = yt[0];
    const y1 = yt[yt.length - 1];
    const fmt = axisFormat(o.unit, hiRaw);
    const X = (v) => MARGIN.left + ((v - x0) / (x1 - x0)) * pw;
    const Y = (v) => MARGIN.top + ph - ((v - y0) / (y1 - y0)) * ph;

    const grid = el("g", { class: "grid" }, svg);
    for (const t of yt) {
      el("line", { x1: MARGIN.left, x2: W - MARGIN.right, y1: Y(t), y2: Y(t) }, grid);
      el("text", { x: MARGIN.left - 8, y: Y(t) + 4, "text-anchor": "end", class: "tick" }, grid, fmt.tick(t));
    }
    const timeAxis = (o.xKind || "time") === "time";
    const xt = timeAxis
      ? timeTicks(x0, x1, Math.max(2, Math.floor(pw / 90))).ticks
      : niceTicks(x0, x1, Math.max(2, Math.floor(pw / 70))).filter((v) => v >= x0 && v <= x1);
    for (const t of xt) {
      el("line", { x1: X(t), x2: X(t), y1: MARGIN.top + ph, y2: MARGIN.top + ph + 4, class: "axis" }, grid);
      const label = timeAxis ? Fmt.clock(t, x1 - x0 > 600) : Fmt.num(t);
      el("text", { x: X(t), y: H - 8, "text-anchor": "middle", class: "tick" }, grid, label);
    }
    el("line", { x1: MARGIN.left, x2: W - MARGIN.right, y1: Y(y0), y2: Y(y0), class: "axis" }, grid);

    const slot = pw / Math.max(1, xs.length);
    for (const s of series) {
      const n = s.values.filter((v) => v != null).length;
      if (s.bars) {
        const g = el("g", { "data-series": s.key, "data-points": n, fill: s.color }, svg);
        s.values.forEach((v, i) => {
          if (v == null || v === 0) return;
          const w = Math.max(1.5, Math.min(10, slot * 0.7));
          el("rect", { x: X(xs[i]) - w / 2, y: Y(Math.max(v, y0)), width: w, height: Math.max(1, Y(y0) - Y(v)), rx: 1 }, g);
        });
        continue;
      }
      const segments = [];
      let seg = [];
      s.values.forEach((v, i) => {
        if (v == null) {
          if (seg.length) segments.push(seg);
          seg = [];
        } else seg.push([X(xs[i]), Y(v)]);
      });
      if (seg.length) segments.push(seg);
      const line = segments.map((pts) => "M" + pts.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join("L")).join("");
      if (s.area) {
        const base = Y(Math.max(y0, 0));
        const area = segments
          .map((pts) => `M${pts[0][0].toFixed(1)},${base}` + pts.map((p) => `L${p[0].toFixed(1)},${p[1].toFixed(1)}`).join("") + `L${pts[pts.length - 1][0].toFixed(1)},${base}Z`)
          .join("");
        el("path", { d: area, fill: s.color, "fill-opacity": 0.16, stroke: "none", class: "area" }, svg);
      }
      el("path", { d: line, fill: "none", stroke: s.color, "stroke-width": 2, "stroke-linejoin": "round", "stroke-linecap": "round", class: "line", "data-series": s.key, "data-points": n }, svg);
      if (n === 1) {
        const only = segments[0][0];
        el("circle", { cx: only[0], cy: only[1], r: 3, fill: s.color }, svg);
      }
    }
    hover(box, svg, { xs, series, X, Y, fmt, top: MARGIN.top, bottom: MARGIN.top + ph, timeAxis, legendValues, o });
  }

  /** Crosshair, dots and a tooltip with every series' value at the nearest sample. */
  function hover(box, svg, h) {
    const cross = el("g", { class: "cross", visibility: "hidden" }, svg);
    const vline = el("line", { y1: h.top, y2: h.bottom }, cross);
    const dots = h.series.map((s) => el("circle", { r: 3.5, fill: s.color, class: "dot" }, cross));
    const tip = html("div", "tooltip", box);
    tip.hidden = true;
    const rect = el("rect", { x: MARGIN.left, y: h.top, width: Math.max(0, svg.width.baseVal.value - MARGIN.left - MARGIN.right), height: h.bottom - h.top, fill: "transparent", class: "overlay" }, svg);
    rect.addEventListener("mousemove", (ev) => {
      const bounds = svg.getBoundingClientRect();
      const px = ev.clientX - bounds.left;
      let best = 0;
      for (let i = 1; i < h.xs.length; i++) if (Math.abs(h.X(h.xs[i]) - px) < Math.abs(h.X(h.xs[best]) - px)) best = i;
      const cx = h.X(h.xs[best]);
      vline.setAttribute("x1", cx);
      vline.setAttribute("x2", cx);
      tip.replaceChildren();
      html("div", "tip-title", tip, h.timeAxis ? Fmt.clock(h.xs[best]) : `${h.o.xLabel || "x"} ${Fmt.num(h.xs[best])}`);
      h.series.forEach((s, k) => {
        const v = s.values[best];
        dots[k].setAttribute("visibility", v == null || s.bars ? "hidden" : "visible");
        if (v != null) {
          dots[k].setAttribute("cx", cx);
          dots[k].setAttribute("cy", h.Y(v));
        }
        const row = html("div", "tip-row", tip);
        html("span", "swatch", row).style.background = s.color;
        html("span", "tip-label", row, s.label);
        html("span", "tip-value", row, h.fmt.value(v));
        h.legendValues[k].textContent = h.fmt.value(v);
      });
      cross.setAttribute("visibility", "visible");
      tip.hidden = false;
      const left = cx + 14 + tip.offsetWidth > bounds.width ? cx - 14 - tip.offsetWidth : cx + 14;
      tip.style.left = left + "px";
      tip.style.top = h.top + tip.parentElement.querySelector(".legend").offsetHeight + "px";
    });
    rect.addEventListener("mouseleave", () => {
      cross.setAttribute("visibility", "hidden");
      tip.hidden = true;
      h.series.forEach((s, k) => {
        const last = [...s.values].reverse().find((v) => v != null);
        h.legendValues[k].textContent = h.fmt.value(last);
      });
    });
  }

  /**
   * Horizontal stacked bars, one row per item: rows [{label, values, note}] with ``parts``
   * [{key, label, color}] naming each stacked value (``note``, at the row's end, defaults to
   * the row's total). Each bar segment carries data-row and data-part.
   */
  function stackedBars(box, rows, parts, opts = {}) {
    mount(box, () => drawBars(box, rows, parts, opts));
  }

  function drawBars(box, rows, parts, o) {
    box.replaceChildren();
    box.classList.add("chart-box");
    const legend = html("div", "legend", box);
    for (const p of parts) {
      const item = html("span", "legend-item", legend);
      html("span", "swatch", item).style.background = p.color;
      html("span", "legend-label", item, p.label);
    }
    const W = Math.max(260, box.clientWidth || 0);
    const rowH = 28;
    const labelW = Math.min(150, Math.max(80, W * 0.24));
    const noteW = o.noteWidth || 92;
    const H = Math.max(1, rows.length) * rowH + 24;
    const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart bars" }, box);
    if (!rows.length) {
      el("text", { x: W / 2, y: H / 2 + 4, class: "empty", "text-anchor": "middle" }, svg, o.empty || "No data yet");
      return;
    }
    const totals = rows.map((r) => r.values.reduce((a, b) => a + (b || 0), 0));
    const ticks = niceTicks(0, Math.max(1, ...totals), Math.max(2, Math.floor((W - labelW - noteW) / 80)));
    const max = ticks[ticks.length - 1];
    const pw = W - labelW - noteW - 8;
    const X = (v) => labelW + (v / max) * pw;
    const grid = el("g", { class: "grid" }, svg);
    for (const t of ticks) {
      el("line", { x1: X(t), x2: X(t), y1: 0, y2: rows.length * rowH }, grid);
      el("text", { x: X(t), y: H - 6, "text-anchor": "middle", class: "tick" }, grid, (o.format || Fmt.num)(t));
    }
    rows.forEach((r, i) => {
      const y = i * rowH;
      el("text", { x: labelW - 10, y: y + rowH / 2 + 4, "text-anchor": "end", class: "row-label" }, svg, r.label);
      let acc = 0;
      r.values.forEach((v, k) => {
        if (!v) return;
        const rect = el("rect", { x: X(acc), y: y + 5, width: Math.max(2, X(acc + v) - X(acc) - 1), height: rowH - 10, rx: 3, fill: parts[k].color, "data-row": r.label, "data-part": parts[k].key }, svg);
        el("title", {}, rect, `${r.label}: ${(o.format || Fmt.num)(v)} ${parts[k].label}`);
        acc += v;
      });
      const note = r.note != null ? r.note : (o.format || Fmt.num)(totals[i]);
      el("text", { x: W - 4, y: y + rowH / 2 + 4, "text-anchor": "end", class: "row-note" }, svg, note);
    });
  }

  /** A small area chart of ``values`` (no axes), ``data-points`` on its line. */
  function sparkline(values, color, w = 132, h = 30) {
    const svg = el("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "spark" });
    const n = values.length;
    const max = Math.max(0, ...values.filter((v) => v != null));
    if (!n || max === 0) {
      el("line", { x1: 0, x2: w, y1: h - 1.5, y2: h - 1.5, class: "spark-flat" }, svg);
      return svg;
    }
    const X = (i) => (n === 1 ? w / 2 : (i / (n - 1)) * (w - 2) + 1);
    const Y = (v) => h - 2 - (v / max) * (h - 5);
    const pts = values.map((v, i) => [X(i), Y(v || 0)]);
    const line = "M" + pts.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join("L");
    el("path", { d: `${line}L${pts[n - 1][0].toFixed(1)},${h}L${pts[0][0].toFixed(1)},${h}Z`, fill: color, "fill-opacity": 0.18 }, svg);
    el("path", { d: line, fill: "none", stroke: color, "stroke-width": 1.5, "data-points": n, class: "line" }, svg);
    return svg;
  }

  return { timeSeries, stackedBars, sparkline, niceTicks, html };
})();
