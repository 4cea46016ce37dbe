/* The console's controller: the admin token, the polling loop, the merged history.
 *
 * The token lives in the variable ``token`` of this closure and nowhere else (no storage, no
 * cookie, no URL; the input is cleared once read); it leaves only as an Authorization header
 * on requests to this server. One poll runs at a time, the next one starts POLL_MS after the
 * previous one ended, and polling stops while the tab is hidden. */
"use strict";

(() => {
  const POLL_MS = 3000; // stats, history since the last row, tenants
  const SLOW_MS = 10000; // usage, fine-tuning jobs and their loss curves
  const MAX_ROWS = 900; // the server keeps 30 min at 2 s
  const EVENT_JOBS = 6; // loss curves drawn
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const $ = (id) => document.getElementById(id);

  let token = null;
  let generation = 0; // bumped on connect/disconnect: a stale loop stops itself
  let timer = null;
  let lastSlow = 0;
  let hist = {}; // {source, t: [...], <column>: [...]} as /admin/history names them
  let slow = { usage: null, jobs: null, events: new Map() };

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    let r;
    try {
      r = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    } catch (e) {
      throw new HttpError(0, "the server cannot be reached");
    }
    if (!r.ok) {
      let message = r.statusText;
      try {
        message = (await r.json()).error.message;
      } catch (e) {
        /* not our error body */
      }
      throw new HttpError(r.status, message);
    }
    return r.json();
  }

  /** A view some servers do not offer: {unavailable: 404} or {error}, auth errors thrown. */
  async function optional(path) {
    try {
      return await api(path);
    } catch (e) {
      if (e.status === 401 || e.status === 403) throw e;
      if (e.status === 404 || e.status === 405 || e.status === 501)
        return { unavailable: e.status };
      return { error: e.message };
    }
  }

  function refusal(e, hadToken) {
    if (e.status === 403) {
      return (
        "This key is a user API key: the admin API refused it (403 Forbidden). " +
        "The console needs the admin token (VERA_ADMIN_TOKEN)."
      );
    }
    if (e.status === 401) {
      return hadToken
        ? "The server did not accept this token (401 Unauthorized). Paste the admin token."
        : "This server requires the admin token (VERA_ADMIN_TOKEN).";
    }
    return `Could not connect: ${e.message}${e.status ? ` (${e.status})` : ""}.`;
  }

  function setStatus(kind, text) {
    $("status").dataset.state = kind;
    $("status-text").textContent = text;
  }

  function showLogin(message) {
    $("dashboard").hidden = true;
    $("login").hidden = false;
    $("disconnect").hidden = true;
    $("server-info").replaceChildren();
    const err = $("login-error");
    err.textContent = message || "";
    err.hidden = !message;
    setStatus("off", "Not connected");
    $("token").focus();
  }

  function disconnect(message) {
    generation += 1;
    clearTimeout(timer);
    token = null;
    hist = {};
    slow = { usage: null, jobs: null, events: new Map() };
    showLogin(message);
  }

  async function connect(ev) {
    ev.preventDefault();
    const input = $("token");
    const candidate = input.value.trim();
    input.value = "";
    token = candidate || null;
    setStatus("busy", "Connecting\u2026");
    let stats;
    try {
      stats = await api("stats");
    } catch (e) {
      const message = refusal(e, Boolean(candidate));
      token = null;
      showLogin(message);
      return;
    }
    $("login").hidden = true;
    $("login-error").hidden = true;
    $("dashboard").hidden = false;
    $("disconnect").hidden = false;
    generation += 1;
    lastSlow = 0;
    draw({ stats });
    poll(generation);
  }

  /** Append the rows after the last one held; an answer from another process (a restarted
   * server, another replica of a cluster) replaces the history instead: returns false then,
   * and the next poll asks for all of it. */
  function mergeHistory(h) {
    if (hist.source !== undefined && hist.source !== h.source) {
      hist = { source: h.source };
      return false;
    }
    hist.source = h.source;
    const before = (hist.t || []).length;
    for (const [name, values] of Object.entries(h.columns)) {
      if (!hist[name]) hist[name] = new Array(before).fill(null);
      hist[name].push(...values);
    }
    const extra = hist.t.length - MAX_ROWS;
    if (extra > 0) for (const name of Object.keys(h.columns)) hist[name].splice(0, extra);
    return true;
  }

  function historyPath() {
    const t = hist.t && hist.t.length ? hist.t[hist.t.length - 1] : null;
    return t == null ? "history" : `history?since=${t}`;
  }

  function usagePath() {
    const minute = Math.floor(Date.now() / 60000) * 60;
    const start = minute - 59 * 60;
    return `../v1/organization/usage/completions?start_time=${start}&bucket_width=1m&group_by=user_id&limit=60`;
  }

  async function pollSlow() {
    const [usage, jobs] = await Promise.all([
      optional(usagePath()),
      optional("../v1/fine_tuning/jobs?limit=10"),
    ]);
    slow.usage = usage;
    slow.jobs = jobs;
    if (!jobs.data) return;
    const wanted = jobs.data.slice(0, EVENT_JOBS);
    await Promise.all(
      wanted.map(async (job) => {
        const have = slow.events.get(job.id);
        if (have && have.final) return; // a finished job's curve does not change
        const got = await optional(
          `../v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/events?limit=1000`,
        );
        if (got.data)
          slow.events.set(job.id, Object.assign(got.data, { final: TERMINAL.has(job.status) }));
      }),
    );
    for (const id of [...slow.events.keys()])
      if (!wanted.some((j) => j.id === id)) slow.events.delete(id);
  }

  async function poll(gen) {
    try {
      const [stats, history, tenants] = await Promise.all([
        api("stats"),
        api(historyPath()),
        optional("tenants"),
      ]);
      if (gen !== generation) return;
      mergeHistory(history);
      if (Date.now() - lastSlow >= SLOW_MS) {
        lastSlow = Date.now();
        await pollSlow();
        if (gen !== generation) return;
      }
      draw({ stats, tenants });
      setStatus("live", `Live · updated ${Fmt.clock(Date.now() / 1000)}`);
    } catch (e) {
      if (gen !== generation) return;
      if (e.status === 401 || e.status === 403) {
        disconnect(refusal(e, true));
        return;
      }
      setStatus("error", `Update failed: ${e.message}; retrying`);
    }
    schedule(gen);
  }

  function schedule(gen) {
    if (gen !== generation) return;
    if (document.hidden) {
      setStatus("paused", "Paused while the tab is hidden");
      return;
    }
    timer = setTimeout(() => poll(gen), POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !$("dashboard").hidden && $("status").dataset.state === "paused") {
      poll(generation);
    }
  });

  function draw({ stats, tenants }) {
    Panels.header(stats);
    Panels.kpis(stats);
    Panels.replicas(stats);
    Panels.history(hist);
    if (tenants) {
      TenantPanels.fairShare(tenants, Boolean(stats.replicas));
      TenantPanels.topUsers(tenants, slow.usage);
    }
    if (slow.jobs) JobPanels.jobs(slow.jobs, slow.events);
  }

  $("login-form").addEventListener("submit", connect);
  $("disconnect").addEventListener("click", () => disconnect(""));
  showLogin("");
})();
