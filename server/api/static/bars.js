/* Bar charts in hand-written SVG: horizontal stacked bars with labels and a value axis, and
 * sparklines. Each bar segment carries data-row and data-part; a sparkline's line carries
 * data-points. */
"use strict";

const Bars = (() => {
  const { el, html, niceTicks, mount } = Svg;

  /**
   * Horizontal stacked bars, one row per item: rows [{label, values, note}] with ``parts``
   * [{key, label, color}] naming each stacked value (``note``, at the row's end, defaults to
   * the row's total); ``opts``: empty, noteWidth, format, integer (whole-number ticks). Each
   * bar segment carries data-row and data-part.
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
    const svg = el(
      "svg",
      { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart bars" },
      box,
    );
    if (!rows.length) {
      el(
        "text",
        { x: W / 2, y: H / 2 + 4, class: "empty", "text-anchor": "middle" },
        svg,
        o.empty || "No data yet",
      );
      return;
    }
    const totals = rows.map((r) => r.values.reduce((a, b) => a + (b || 0), 0));
    const ticks = niceTicks(
      0,
      Math.max(1, ...totals),
      Math.max(2, Math.floor((W - labelW - noteW) / 80)),
      o.integer,
    );
    const max = ticks[ticks.length - 1];
    const pw = W - labelW - noteW - 8;
    const X = (v) => labelW + (v / max) * pw;
    const grid = el("g", { class: "grid" }, svg);
    for (const t of ticks) {
      el("line", { x1: X(t), x2: X(t), y1: 0, y2: rows.length * rowH }, grid);
      el(
        "text",
        { x: X(t), y: H - 6, "text-anchor": "middle", class: "tick" },
        grid,
        (o.format || Fmt.num)(t),
      );
    }
    rows.forEach((r, i) => {
      const y = i * rowH;
      el(
        "text",
        { x: labelW - 10, y: y + rowH / 2 + 4, "text-anchor": "end", class: "row-label" },
        svg,
        r.label,
      );
      let acc = 0;
      r.values.forEach((v, k) => {
        if (!v) return;
        const rect = el(
          "rect",
          {
            x: X(acc),
            y: y + 5,
            width: Math.max(2, X(acc + v) - X(acc) - 1),
            height: rowH - 10,
            rx: 3,
            fill: parts[k].color,
            "data-row": r.label,
            "data-part": parts[k].key,
          },
          svg,
        );
        el("title", {}, rect, `${r.label}: ${(o.format || Fmt.num)(v)} ${parts[k].label}`);
        acc += v;
      });
      const note = r.note != null ? r.note : (o.format || Fmt.num)(totals[i]);
      el(
        "text",
        { x: W - 4, y: y + rowH / 2 + 4, "text-anchor": "end", class: "row-note" },
        svg,
        note,
      );
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
    el(
      "path",
      {
        d: `${line}L${pts[n - 1][0].toFixed(1)},${h}L${pts[0][0].toFixed(1)},${h}Z`,
        fill: color,
        "fill-opacity": 0.18,
      },
      svg,
    );
    el(
      "path",
      {
        d: line,
        fill: "none",
        stroke: color,
        "stroke-width": 1.5,
        "data-points": n,
        class: "line",
      },
      svg,
    );
    return svg;
  }

  return { stacked: stackedBars, sparkline };
})();
