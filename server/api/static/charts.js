/* Time series charts in hand-written SVG: lines, areas and bars over time (or over steps),
 * with axes, a legend holding the latest values, and a crosshair tooltip.
 *
 * A chart redraws from the options it was last given when its box is resized, starts its value
 * axis at zero unless told otherwise, leaves a gap where a value is null, and marks each drawn
 * series with data-series and data-points (the number of values drawn). */
"use strict";

const Charts = (() => {
  const { el, html, niceTicks, timeTicks, axisFormat, mount } = Svg;
  const MARGIN = { left: 58, right: 14, top: 12, bottom: 26 };

  /**
   * A time series chart in ``box``. ``opts``: x (unix seconds, or numbers with xKind "number"
   * and xLabel naming them in the tooltip), series [{key, label, color, values, area, bars,
   * hidden}], unit ("bytes", "ms", "count" for whole numbers, another unit's name, or none),
   * height, zero (default true), empty (text when nothing to draw).
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
      el(
        "text",
        { x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle" },
        svg,
        o.empty || "No data yet",
      );
      return;
    }
    const pw = W - MARGIN.left - MARGIN.right;
    const ph = H - MARGIN.top - MARGIN.bottom;
    let x0 = xs[0];
    let x1 = xs[xs.length - 1];
    if (x1 === x0) {
      x0 -= 1;
      x1 += 1;
    }
    const zero = o.zero !== false;
    const lo = zero ? Math.min(0, ...values) : Math.min(...values);
    const hiRaw = Math.max(...values);
    // ticks are round numbers in the axis's unit (MiB for bytes), so scale before choosing
    const div = o.unit === "bytes" ? Fmt.byteScale(hiRaw).div : 1;
    const flat = lo === hiRaw;
    const counts = o.unit === "count";
    const yt = niceTicks(
      (flat && !zero ? lo - 1 : lo) / div,
      (flat ? lo + 1 : hiRaw) / div,
      4,
      counts,
    ).map((t) => t * div);
    const y0 = yt[0];
    const y1 = yt[yt.length - 1];
    const fmt = axisFormat(o.unit, hiRaw);
    const X = (v) => MARGIN.left + ((v - x0) / (x1 - x0)) * pw;
    const Y = (v) => MARGIN.top + ph - ((v - y0) / (y1 - y0)) * ph;

    const grid = el("g", { class: "grid" }, svg);
    for (const t of yt) {
      el("line", { x1: MARGIN.left, x2: W - MARGIN.right, y1: Y(t), y2: Y(t) }, grid);
      el(
        "text",
        { x: MARGIN.left - 8, y: Y(t) + 4, "text-anchor": "end", class: "tick" },
        grid,
        fmt.tick(t),
      );
    }
    const timeAxis = (o.xKind || "time") === "time";
    const xt = timeAxis
      ? timeTicks(x0, x1, Math.max(3, Math.floor(pw / 80))).ticks
      : niceTicks(x0, x1, Math.max(2, Math.floor(pw / 70)), true).filter((v) => v >= x0 && v <= x1);
    for (const t of xt) {
      el(
        "line",
        { x1: X(t), x2: X(t), y1: MARGIN.top + ph, y2: MARGIN.top + ph + 4, class: "axis" },
        grid,
      );
      const label = timeAxis ? Fmt.clock(t, x1 - x0 > 600) : Fmt.num(t);
      el("text", { x: X(t), y: H - 8, "text-anchor": "middle", class: "tick" }, grid, label);
    }
    el(
      "line",
      { x1: MARGIN.left, x2: W - MARGIN.right, y1: Y(y0), y2: Y(y0), class: "axis" },
      grid,
    );

    const slot = pw / Math.max(1, xs.length);
    for (const s of series) {
      const n = s.values.filter((v) => v != null).length;
      if (s.bars) {
        const g = el("g", { "data-series": s.key, "data-points": n, fill: s.color }, svg);
        s.values.forEach((v, i) => {
          if (v == null || v === 0) return;
          const w = Math.max(1.5, Math.min(10, slot * 0.7));
          el(
            "rect",
            {
              x: Math.min(Math.max(X(xs[i]) - w / 2, MARGIN.left), MARGIN.left + pw - w),
              y: Y(Math.max(v, y0)),
              width: w,
              height: Math.max(1, Y(y0) - Y(v)),
              rx: 1,
            },
            g,
          );
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
      const line = segments
        .map((pts) => "M" + pts.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join("L"))
        .join("");
      if (s.area) {
        const base = Y(Math.max(y0, 0));
        const area = segments
          .map(
            (pts) =>
              `M${pts[0][0].toFixed(1)},${base}` +
              pts.map((p) => `L${p[0].toFixed(1)},${p[1].toFixed(1)}`).join("") +
              `L${pts[pts.length - 1][0].toFixed(1)},${base}Z`,
          )
          .join("");
        el(
          "path",
          { d: area, fill: s.color, "fill-opacity": 0.16, stroke: "none", class: "area" },
          svg,
        );
      }
      el(
        "path",
        {
          d: line,
          fill: "none",
          stroke: s.color,
          "stroke-width": 2,
          "stroke-linejoin": "round",
          "stroke-linecap": "round",
          class: "line",
          "data-series": s.key,
          "data-points": n,
        },
        svg,
      );
      if (n === 1) {
        const only = segments[0][0];
        el("circle", { cx: only[0], cy: only[1], r: 3, fill: s.color }, svg);
      }
    }
    hover(box, svg, {
      xs,
      series,
      X,
      Y,
      fmt,
      top: MARGIN.top,
      bottom: MARGIN.top + ph,
      timeAxis,
      legendValues,
      o,
    });
  }

  /** Crosshair, dots and a tooltip with every series' value at the sample nearest the
   * pointer; the legend shows those values while the pointer is on the chart. */
  function hover(box, svg, h) {
    const cross = el("g", { class: "cross", visibility: "hidden" }, svg);
    const vline = el("line", { y1: h.top, y2: h.bottom }, cross);
    const dots = h.series.map((s) => el("circle", { r: 3.5, fill: s.color, class: "dot" }, cross));
    const tip = html("div", "tooltip", box);
    tip.hidden = true;
    const rect = el(
      "rect",
      {
        x: MARGIN.left,
        y: h.top,
        width: Math.max(0, svg.width.baseVal.value - MARGIN.left - MARGIN.right),
        height: h.bottom - h.top,
        fill: "transparent",
        class: "overlay",
      },
      svg,
    );
    const show = (px) => {
      const width = svg.width.baseVal.value;
      let best = 0;
      for (let i = 1; i < h.xs.length; i++)
        if (Math.abs(h.X(h.xs[i]) - px) < Math.abs(h.X(h.xs[best]) - px)) best = i;
      const cx = h.X(h.xs[best]);
      vline.setAttribute("x1", cx);
      vline.setAttribute("x2", cx);
      tip.replaceChildren();
      html(
        "div",
        "tip-title",
        tip,
        h.timeAxis ? Fmt.clock(h.xs[best]) : `${h.o.xLabel || "x"} ${Fmt.num(h.xs[best])}`,
      );
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
      const left = cx + 14 + tip.offsetWidth > width ? cx - 14 - tip.offsetWidth : cx + 14;
      tip.style.left = left + "px";
      tip.style.top = h.top + tip.parentElement.querySelector(".legend").offsetHeight + "px";
    };
    rect.addEventListener("mousemove", (ev) => {
      box._hoverPx = ev.clientX - svg.getBoundingClientRect().left;
      show(box._hoverPx);
    });
    // a redraw (new data, every few seconds) under a resting pointer keeps its tooltip
    if (box._hoverPx != null) show(box._hoverPx);
    rect.addEventListener("mouseleave", () => {
      box._hoverPx = null;
      cross.setAttribute("visibility", "hidden");
      tip.hidden = true;
      h.series.forEach((s, k) => {
        const last = [...s.values].reverse().find((v) => v != null);
        h.legendValues[k].textContent = h.fmt.value(last);
      });
    });
  }

  return { timeSeries };
})();
