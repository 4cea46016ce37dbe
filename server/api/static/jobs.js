/* The fine-tuning panel: the most recent jobs, each with its status and its training loss per
 * step (the ``metrics`` events of ``GET /v1/fine_tuning/jobs/{id}/events``). */
"use strict";

const JobPanels = (() => {
  const $ = (id) => document.getElementById(id);
  const h = Svg.html;
  const { C, notice, problem } = Panels;

  const STATUS = {
    succeeded: "ok",
    failed: "bad",
    cancelled: "muted",
    running: "live",
    validating_files: "live",
    queued: "muted",
  };

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
      const steps = (events.get(job.id) || [])
        .filter((e) => e.type === "metrics" && e.data && e.data.train_loss != null)
        .reverse();
      const last = steps[steps.length - 1];
      h("div", "job-id mono", card, job.id);
      const info = [`${Fmt.num(job.trained_tokens || 0)} tokens trained`];
      if (last)
        info.push(
          `step ${last.data.step}/${last.data.total_steps}`,
          `loss ${Fmt.short(last.data.train_loss)}`,
        );
      h("div", "job-info", card, info.join(" · "));
      const chart = h("div", "job-chart", card);
      Charts.timeSeries(chart, {
        x: steps.map((e) => e.data.step),
        xKind: "number",
        xLabel: "step",
        zero: false,
        height: 150,
        empty: job.status === "queued" ? "Queued" : "No loss reported yet",
        series: [
          {
            key: "train_loss",
            label: "training loss",
            color: C.pink,
            values: steps.map((e) => e.data.train_loss),
            area: false,
          },
        ],
      });
    }
  }

  return { jobs };
})();
