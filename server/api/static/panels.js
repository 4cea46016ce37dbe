/* The server's panels: the top bar, key figures, the charts over time (/admin/history) and the
 * replicas of a cluster; and what every panel shares: the palette, and how a panel says that
 * its view is missing ({unavailable: status}: the server does not offer it) or failed
 * ({error: message}), without stopping the other panels. */
"use strict";

const Panels = (() => {
  const $ = (id) => document.getElementById(id);
  const h = Svg.html;
  const C = {
    blue: "#60a5fa",
    violet: "#a78bfa",
    rose: "#fb7185",
    amber: "#fbbf24",
    emerald: "#34d399",
    indigo: "#818cf8",
    teal: "#2dd4bf",
    orange: "#fb923c",
    sky: "#38bdf8",
    pink: "#f472b6",
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
      notice(
        box,
        `Not available on this server: ${what} answered ${view.unavailable}.`,
        "unavailable",
      );
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
    if (stats.replicas)
      chip(
        `${v.healthy_replicas}/${v.replicas} replicas healthy`,
        v.healthy_replicas === v.replicas ? "ok" : "bad",
      );
    else {
      chip(`${stats.device} · ${stats.dtype}`);
      const store = stats.store || {};
      chip(
        store.reachable ? `store: ${store.location}` : "store unreachable",
        store.reachable ? "" : "bad",
      );
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
      [
        "Throughput",
        `${Fmt.num(e.tokens_per_s)} tok/s`,
        `${Fmt.num(e.completion_tokens)} tokens in all`,
      ],
      ["TTFT p50" + of, Fmt.ms(ttft.p50), `p99 ${Fmt.ms(ttft.p99)}`],
      ["Latency p50" + of, Fmt.ms(latency.p50), `p99 ${Fmt.ms(latency.p99)}`],
      [
        "Waiting",
        Fmt.num(e.queue_depth),
        `${Fmt.num(e.running_batch)} running · ${Fmt.num(e.preemptions)} preempted`,
      ],
      [
        "Requests",
        Fmt.num(e.requests_submitted),
        finishes(e.finish_reasons, e.rate_limited_requests),
      ],
      [
        "Adapters on device",
        `${Fmt.num(a.slots_used)} / ${Fmt.num(a.slots_total)}`,
        `${Fmt.num(a.host && a.host.adapters)} in host · ${Fmt.num(a.stored)} stored`,
      ],
      ["Memory", Fmt.bytes(m.host_rss_bytes), `KV cache ${Fmt.bytes(m.kv_cache_bytes)}`],
      [
        "Fine-tuning",
        ft.current_job ? "training" : "idle",
        ft.current_job || `${Fmt.seconds(ft.training_seconds)} trained`,
      ],
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
    const all = (replicas || [])
      .map((r) => (r.engine || {})[key])
      .filter((p) => p && p.p50 != null);
    if (!all.length) return {};
    return { p50: Math.max(...all.map((p) => p.p50)), p99: Math.max(...all.map((p) => p.p99)) };
  }

  function finishes(reasons, limited) {
    const entries = Object.entries(reasons || {}).sort((a, b) => b[1] - a[1]);
    const done = entries.length
      ? "finished: " + entries.map(([k, n]) => `${Fmt.num(n)} ${k}`).join(" · ")
      : "none finished yet";
    return limited ? `${done} · refused: ${Fmt.num(limited)} rate-limited` : done;
  }

  function deltas(values) {
    return values.map((v, i) =>
      i === 0 || v == null || values[i - 1] == null ? null : Math.max(0, v - values[i - 1]),
    );
  }

  /** Every chart fed by /admin/history (columns, oldest first). */
  function history(cols) {
    const x = cols.t || [];
    const col = (k) => cols[k] || x.map(() => null);
    const empty = "Waiting for the first samples\u2026";
    Charts.timeSeries($("chart-throughput"), {
      x,
      unit: "tok/s",
      empty,
      series: [
        {
          key: "tokens_per_s",
          label: "output tokens/s",
          color: C.blue,
          values: col("tokens_per_s"),
          area: true,
        },
      ],
    });
    Charts.timeSeries($("chart-ttft"), {
      x,
      unit: "ms",
      empty,
      series: [
        {
          key: "ttft_p50_ms",
          label: "p50",
          color: C.violet,
          values: col("ttft_p50_ms"),
          area: true,
        },
        { key: "ttft_p99_ms", label: "p99", color: C.rose, values: col("ttft_p99_ms") },
      ],
    });
    Charts.timeSeries($("chart-queue"), {
      x,
      unit: "count",
      empty,
      series: [
        {
          key: "queue_depth",
          label: "waiting",
          color: C.amber,
          values: col("queue_depth"),
          area: true,
        },
        {
          key: "running_batch",
          label: "running batch",
          color: C.emerald,
          values: col("running_batch"),
        },
        {
          key: "preemptions",
          label: "preempted",
          color: C.rose,
          values: deltas(col("preemptions")),
          bars: true,
        },
      ],
    });
    Charts.timeSeries($("chart-tiers"), {
      x,
      unit: "count",
      empty,
      series: TIERS.map((t) => ({
        key: `${t.key}_adapters`,
        label: t.label,
        color: t.color,
        values: col(`${t.key}_adapters`),
      })),
    });
    Charts.timeSeries($("chart-tier-bytes"), {
      x,
      unit: "bytes",
      empty,
      series: TIERS.map((t) => ({
        key: `${t.key}_bytes`,
        label: t.label,
        color: t.color,
        values: col(`${t.key}_bytes`),
      })),
    });
    const device = col("device_allocated_bytes");
    Charts.timeSeries($("chart-memory"), {
      x,
      unit: "bytes",
      empty,
      series: [
        {
          key: "host_rss_bytes",
          label: "process RSS",
          color: C.sky,
          values: col("host_rss_bytes"),
          area: true,
        },
        {
          key: "kv_cache_bytes",
          label: "KV cache",
          color: C.violet,
          values: col("kv_cache_bytes"),
        },
        {
          key: "device_allocated_bytes",
          label: "GPU allocated",
          color: C.pink,
          values: device,
          hidden: device.every((v) => v == null),
        },
      ],
    });
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
    const cols = [
      "Replica",
      "Node",
      "PID",
      "Health",
      "Report age",
      "Tokens/s",
      "TTFT p50",
      "Queue",
      "Running",
      "Adapters on device",
      "RSS",
      "KV cache",
    ];
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
      h(
        "span",
        "badge " + (r.healthy ? "ok" : "bad"),
        h("td", "", tr),
        r.healthy ? "healthy" : "down",
      );
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

  return { C, USER_COLORS, notice, problem, header, kpis, history, replicas };
})();
