/* The tenants' panels: the fair-share view (running and waiting per user, virtual token
 * counters) and the top users of the last hour with their limits (``GET /admin/tenants``, and
 * per-minute tokens from the usage API). */
"use strict";

const TenantPanels = (() => {
  const $ = (id) => document.getElementById(id);
  const h = Svg.html;
  const { C, USER_COLORS, notice, problem } = Panels;

  /** ``cluster``: the view is the answering replica's engine (each replica schedules its own). */
  function fairShare(view, cluster) {
    const body = $("fair-body");
    const meta = $("fair-meta");
    meta.replaceChildren();
    if (problem(body, view, "GET /admin/tenants")) return;
    if (!body.querySelector("#chart-fair")) {
      body.replaceChildren();
      for (const [id, title] of [
        ["chart-fair", "In the engine now"],
        ["chart-counters", "Virtual token counter (weighted service received)"],
      ]) {
        const col = h("div", "subpanel", body);
        h("h3", "", col, title);
        h("div", "", col).id = id;
      }
    }
    h("span", "chip strong", meta, `scheduling: ${view.scheduling}`);
    if (cluster) h("span", "chip", meta, "one replica's engine");
    if (view.weights)
      h(
        "span",
        "chip",
        meta,
        `charge: ${view.weights.input}×input + ${view.weights.output}×output`,
      );
    h("span", "chip", meta, `${Fmt.num(view.preemptions)} preemptions`);
    const rows = [...view.tenants]
      .sort(
        (a, b) =>
          b.running + b.waiting - (a.running + a.waiting) ||
          b.counter - a.counter ||
          a.user_id.localeCompare(b.user_id),
      )
      .slice(0, 12);
    Bars.stacked(
      $("chart-fair"),
      rows.map((r) => ({
        label: r.user_id,
        values: [r.running, r.waiting],
        note: `weight ${Fmt.num(r.limits.weight)}`,
      })),
      [
        { key: "running", label: "running", color: C.emerald },
        { key: "waiting", label: "waiting", color: C.amber },
      ],
      { empty: "No user has sent a request yet", noteWidth: 70, integer: true },
    );
    Bars.stacked(
      $("chart-counters"),
      rows.map((r) => ({ label: r.user_id, values: [r.counter] })),
      [{ key: "counter", label: "counter (tokens ÷ weight)", color: C.indigo }],
      { empty: "No counters yet", noteWidth: 56 },
    );
  }

  /** Tokens per minute over the last hour per user, from the usage API's 1m buckets. */
  function perMinute(usage) {
    const out = new Map();
    if (!usage || !usage.data) return out;
    usage.data.forEach((bucket, i) => {
      for (const r of bucket.results) {
        if (!r.user_id) continue;
        if (!out.has(r.user_id))
          out.set(
            r.user_id,
            usage.data.map(() => 0),
          );
        out.get(r.user_id)[i] += r.input_tokens + r.output_tokens;
      }
    });
    return out;
  }

  function topUsers(tenants, usage) {
    const box = $("usage-body");
    if (problem(box, tenants, "GET /admin/tenants")) return;
    const minutes = perMinute(usage);
    const rows = [...tenants.tenants]
      .map((r) => ({ ...r, tokens: r.last_hour.input_tokens + r.last_hour.output_tokens }))
      .sort((a, b) => b.tokens - a.tokens || b.last_hour.requests - a.last_hour.requests)
      .slice(0, 10);
    if (!rows.length) return notice(box, "No usage in the last hour.");
    const most = Math.max(1, ...rows.map((r) => r.tokens));
    const table = h("table", "users");
    const head = h("tr", "", h("thead", "", table));
    for (const t of [
      "User",
      "Requests",
      "Tokens, last hour (input · output)",
      "Last 60 min",
      "Weight",
      "Req/min",
      "Tok/min",
      "In flight",
      "Queued",
    ])
      h("th", "", head, t);
    const tbody = h("tbody", "", table);
    rows.forEach((r, i) => {
      const tr = h("tr", "", tbody);
      tr.dataset.user = r.user_id;
      const name = h("td", "user", tr);
      h("span", "user-name", name, r.user_id);
      if (r.overridden) h("span", "badge", name, "override");
      h("td", "num", tr, Fmt.num(r.last_hour.requests));
      const tokens = h("td", "tokens", tr);
      const bar = h("div", "token-bar", tokens);
      const part = (n, cls) => {
        h("span", cls, bar).style.width = (100 * n) / most + "%";
      };
      part(r.last_hour.input_tokens, "in");
      part(r.last_hour.output_tokens, "out");
      h(
        "span",
        "token-text",
        tokens,
        `${Fmt.num(r.last_hour.input_tokens)} · ${Fmt.num(r.last_hour.output_tokens)}`,
      );
      const spark = h("td", "spark-cell", tr);
      if (usage && usage.unavailable) spark.textContent = Fmt.DASH;
      else
        spark.appendChild(
          Bars.sparkline(minutes.get(r.user_id) || [], USER_COLORS[i % USER_COLORS.length]),
        );
      const lim = r.limits;
      h("td", "num", tr, Fmt.num(lim.weight));
      for (const k of ["requests_per_minute", "tokens_per_minute", "max_concurrent", "max_queued"])
        h("td", "num", tr, Fmt.limit(lim[k]));
    });
    box.replaceChildren();
    h("div", "table-wrap", box).appendChild(table);
    h(
      "p",
      "footnote",
      box,
      "0 = unlimited (∞). Sparklines: prompt + generated tokens per minute (usage API).",
    );
  }

  return { fairShare, topUsers };
})();
