/* The console's panels: each function draws one panel from the JSON the admin API answered.
 * A panel given {unavailable: status} says the server does not offer that view; one given
 * {error: message} says what failed; neither stops the other panels. */
"use strict";

const Panels = (() => {
  const $ = (id) => document.getElementById(id);
  const h = Charts.html;
  const C = {
    blue: "#60a5fa", violet: "#a78bfa", rose: "#fb7185", amber: "#fbbf24",
    emerald: "#34d399", indigo: "#818cf8", teal: "#2dd4bf", orange: "#fb923c",
    sky: "#38bdf8", pink: "#f472b6",
  };
  const TIERS = [
    { key: "device", label: "device (GPU slots)", color: C.indigo },
    { key: "host", label: "host memory", color: C.teal },
    { key: "disk", label: "store", color: C.orange },
  ];
  const USER_COLORS = [C.blue, C.emerald, C.violet, C.amber, C.pink, C.teal, C.orange, C.sky];

  function notice(box, text, kind = "muted") {
    box.replaceChildren();
    h("div", "notice " + kind, box, text);
  }

  function problem(box, view, what) {
    if (view && view.unavailable) {
      notice(box, `Not available on this server: ${what} answered ${view.unavailable}.`, "unavailable");
      return true;
    }
    if (view && view.error) {
      notice(box, `Could not load ${what}: ${view.error}`, "error");
      return true;
    }
    return false;
  }

  /** The single server's stats, or the cluster's totals. */
  const overall = (stats) => stats.totals || stats;

  function header(stats) {
    const box = $("server-info");
    box.replaceChildren();
    const v = overall(stats);
    const chip = (text, cls = "") => h("span", "chip " + cls, box, text);
    if (stats.model) chip(stats.model, "strong");
    if (stats.replicas) chip(`${v.healthy_replicas}/${v.replicas} replicas healthy`, v.healthy_replicas === v.replicas ? "ok" : "bad");
    else {
      chip(`${stats.device} · ${stats.dtype}`);
      const store = stats.store || {};
      chip(store.reachable ? `store: ${store.location}` : "store unreachable", store.reachable ? "" : "bad");
    }
  }

  function kpis(stats) {
    const v = overall(stats);
    const e = v.engine || {};
    const a = v.adapters || {};
    const m = v.memory || {};
    const ft = v.fine_tuning || {};
    // a cluster's percentiles are per replica: show the slowest replica's
    const ttft = e.ttft_ms || slowest(stats.replicas, "ttft_ms");
    const latency = e.latency_ms || slowest(stats.replicas, "latency_ms");
    const of = stats.replicas ? " (slowest replica)" : "";
    const tiles = [
      ["Throughput", `${Fmt.num(e.tokens_per_s)} tok/s`, `${Fmt.num(e.completion_tokens)} tokens in all`],
      ["TTFT p50" + of, Fmt.ms(ttft.p50), `p99 ${Fmt.ms(ttft.p99)}`],
      ["Latency p50" + of, Fmt.ms(latency.p50), `p99 ${Fmt.ms(latency.p99)}`],
      ["Waiting", Fmt.num(e.queue_depth), `${Fmt.num(e.running_batch)} running · ${Fmt.num(e.preemptions)} preempted`],
      ["Requests", Fmt.num(e.requests_submitted), finishes(e.finish_reasons)],
      ["Adapters on device", `${Fmt.num(a.slots_used)} / ${Fmt.num(a.slots_total)}`, `${Fmt.num(a.host && a.host.adapters)} in host · ${Fmt.num(a.stored)} stored`],
      ["Memory", Fmt.bytes(m.host_rss_bytes), `KV cache ${Fmt.bytes(m.kv_cache_bytes)}`],
      ["Fine-tuning", ft.current_job ? "training" : "idle", ft.current_job || `${Fmt.seconds(ft.training_seconds)} trained`],
    ];
    const box = $("kpis");
    box.replaceChildren();
    for (const [label, value, sub] of tiles) {
      const tile = h("div", "kpi", box);
      h("div", "kpi-label", tile, label);
      h("div", "kpi-value", tile, value);
      h("div", "kpi-sub", tile, sub);
    }
  }

  function slowest(replicas, key) {
    const all = (replicas || []).map((r) => (r.engine || {})[key]).filter((p) => p && p.p50 != null);
    if (!all.length) return {};
    return { p50: Math.max(...all.map((p) => p.p50)), p99: Math.max(...all.map((p) => p.p99)) };
  }

  function finishes(reasons) {
    const entries = Object.entries(reasons || {}).sort((a, b) => b[1] - a[1]);
    return entries.length ? "finished: " + entries.map(([k, n]) => `${Fmt.num(n)} ${k}`).join(" · ") : "none finished yet";
  }

  function deltas(values) {
    return values.map((v, i) => (i === 0 || v == null || values[i - 1] == null ? null : Math.max(0, v - values[i - 1])));
  }

  /** Every chart fed by /admin/history (columns, oldest first). */
  function history(cols) {
    const x = cols.t || [];
    const col = (k) => cols[k] || x.map(() => null);
    const empty = "Waiting for the first samples\u2026";
    Charts.timeSeries($("chart-throughput"), {
      x, unit: "tok/s", empty,
      series: [{ key: "tokens_per_s", label: "output tokens/s", color: C.blue, values: col("tokens_per_s"), area: true }],
    });
    Charts.timeSeries($("chart-ttft"), {
      x, unit: "ms", empty,
      series: [
        { key: "ttft_p50_ms", label: "p50", color: C.violet, values: col("ttft_p50_ms"), area: true },
        { key: "ttft_p99_ms", label: "p99", color: C.rose, values: col("ttft_p99_ms") },
      ],
    });
    Charts.timeSeries($("chart-queue"), {
      x, unit: "count", empty,
      series: [
        { key: "queue_depth", label: "waiting", color: C.amber, values: col("queue_depth"), area: true },
        { key: "running_batch", label: "running batch", color: C.emerald, values: col("running_batch") },
        { key: "preemptions", label: "preempted", color: C.rose, values: deltas(col("preemptions")), bars: true },
      ],
    });
    Charts.timeSeries($("chart-tiers"), {
      x, unit: "count", empty,
      series: TIERS.map((t) => ({ key: `${t.key}_adapters`, label: t.label, color: t.color, values: col(`${t.key}_adapters`) })),
    });
    Charts.timeSeries($("chart-tier-bytes"), {
      x, unit: "bytes", empty,
      series: TIERS.map((t) => ({ key: `${t.key}_bytes`, label: t.label, color: t.color, values: col(`${t.key}_bytes`) })),
    });
    const device = col("device_allocated_bytes");
    Charts.timeSeries($("chart-memory"), {
      x, unit: "bytes", empty,
      series: [
        { key: "host_rss_bytes", label: "process RSS", color: C.sky, values: col("host_rss_bytes"), area: true },
        { key: "kv_cache_bytes", label: "KV cache", color: C.violet, values: col("kv_cache_bytes") },
        { key: "device_allocated_bytes", label: "GPU allocated", color: C.pink, values: device, hidden: device.every((v) => v == null) },
      ],
    });
  }

  function fairShare(view) {
    const body = $("fair-body");
    const meta = $("fair-meta");
    meta.replaceChildren();
    if (problem(body, view, "GET /admin/tenants")) return;
    if (!body.querySelector("#chart-fair")) {
      body.replaceChildren();
      for (const [id, title] of [["chart-fair", "In the engine now"], ["chart-counters", "Virtual token counter (weighted service received)"]]) {
        const col = h("div", "subpanel", body);
        h("h3", "", col, title);
        h("div", "", col).id = id;
      }
    }
    h("span", "chip strong", meta, `scheduling: ${view.scheduling}`);
    if (view.weights) h("span", "chip", meta, `charge: ${view.weights.input}×input + ${view.weights.output}×output`);
    h("span", "chip", meta, `${Fmt.num(view.preemptions)} preemptions`);
    const rows = [...view.tenants]
      .sort((a, b) => b.running + b.waiting - (a.running + a.waiting) || b.counter - a.counter || a.user_id.localeCompare(b.user_id))
      .slice(0, 12);
    Charts.stackedBars(
      $("chart-fair"),
      rows.map((r) => ({ label: r.user_id, values: [r.running, r.waiting], note: `weight ${Fmt.num(r.limits.weight)}` })),
      [{ key: "running", label: "running", color: C.emerald }, { key: "waiting", label: "waiting", color: C.amber }],
      { empty: "No user has sent a request yet", noteWidth: 70 },
    );
    Charts.stackedBars(
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
        if (!out.has(r.user_id)) out.set(r.user_id, usage.data.map(() => 0));
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
    for (const t of ["User", "Requests", "Tokens, last hour (input · output)", "Last 60 min", "Weight", "Req/min", "Tok/min", "In flight", "Queued"]) h("th", "", head, t);
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
      const part = (n, cls) => { h("span", cls, bar).style.width = (100 * n) / most + "%"; };
      part(r.last_hour.input_tokens, "in");
      part(r.last_hour.output_tokens, "out");
      h("span", "token-text", tokens, `${Fmt.num(r.last_hour.input_tokens)} · ${Fmt.num(r.last_hour.output_tokens)}`);
      const spark = h("td", "spark-cell", tr);
      if (usage && usage.unavailable) spark.textContent = Fmt.DASH;
      else spark.appendChild(Charts.sparkline(minutes.get(r.user_id) || [], USER_COLORS[i % USER_COLORS.length]));
      const lim = r.limits;
      h("td", "num", tr, Fmt.num(lim.weight));
      for (const k of ["requests_per_minute", "tokens_per_minute", "max_concurrent", "max_queued"]) h("td", "num", tr, Fmt.limit(lim[k]));
    });
    box.replaceChildren(table);
    h("p", "footnote", box, "0 = unlimited (∞). Sparklines: prompt + generated tokens per minute (usage API).");
  }

  const STATUS = { succeeded: "ok", failed: "bad", cancelled: "muted", running: "live", validating_files: "live", queued: "muted" };

  function jobs(list, events) {
    const box = $("jobs-body");
    if (problem(box, list, "GET /v1/fine_tuning/jobs")) return;
    if (!list.data.length) return notice(box, "No fine-tuning jobs yet.");
    box.replaceChildren();
    for (const job of list.data.slice(0, 6)) {
      const card = h("div", "job", box);
      card.dataset.job = job.id;
      const top = h("div", "job-head", card);
      h("span", "job-user", top, job.user_id || job.fine_tuned_model || Fmt.DASH);
      h("span", "badge " + (STATUS[job.status] || ""), top, job.status);
      const steps = (events.get(job.id) || []).filter((e) => e.type === "metrics" && e.data && e.data.train_loss != null).reverse();
      const last = steps[steps.length - 1];
      h("div", "job-id mono", card, job.id);
      const info = [`${Fmt.num(job.trained_tokens || 0)} tokens trained`];
      if (last) info.push(`step ${last.data.step}/${last.data.total_steps}`, `loss ${Fmt.short(last.data.train_loss)}`);
      h("div", "job-info", card, info.join(" · "));
      const chart = h("div", "job-chart", card);
      Charts.timeSeries(chart, {
        x: steps.map((e) => e.data.step), xKind: "number", xLabel: "step", unit: "count", zero: false, height: 150,
        empty: job.status === "queued" ? "Queued" : "No loss reported yet",
        series: [{ key: "train_loss", label: "training loss", color: C.pink, values: steps.map((e) => e.data.train_loss), area: false }],
      });
    }
  }

  function replicas(stats) {
    const section = $("replicas");
    $("history-note").hidden = !stats.replicas;
    if (!stats.replicas) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    const table = h("table", "replicas");
    const head = h("tr", "", h("thead", "", table));
    const cols = ["Replica", "Node", "PID", "Health", "Report age", "Tokens/s", "TTFT p50", "Queue", "Running", "Adapters on device", "RSS", "KV cache"];
    for (const c of cols) h("th", "", head, c);
    const tbody = h("tbody", "", table);
    for (const r of stats.replicas) {
      const e = r.engine || {};
      const a = r.adapters || {};
      const m = r.memory || {};
      const tr = h("tr", "", tbody);
      tr.dataset.replica = r.replica;
      h("td", "mono", tr, r.replica);
      h("td", "", tr, r.node);
      h("td", "num", tr, String(r.pid));
      h("span", "badge " + (r.healthy ? "ok" : "bad"), h("td", "", tr), r.healthy ? "healthy" : "down");
      h("td", "num", tr, Fmt.seconds(r.report_age_s));
      h("td", "num", tr, Fmt.num(e.tokens_per_s));
      h("td", "num", tr, Fmt.ms(e.ttft_ms && e.ttft_ms.p50));
      h("td", "num", tr, Fmt.num(e.queue_depth));
      h("td", "num", tr, Fmt.num(e.running_batch));
      h("td", "num", tr, `${Fmt.num(a.slots_used)} / ${Fmt.num(a.slots_total)}`);
      h("td", "num", tr, Fmt.bytes(m.host_rss_bytes));
      h("td", "num", tr, Fmt.bytes(m.kv_cache_bytes));
    }
    $("replicas-body").replaceChildren(table);
  }

  return { header, kpis, history, fairShare, topUsers, jobs, replicas, notice };
})();
