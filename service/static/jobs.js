// Jobs list: newest first, filtered by state and label, refreshed while jobs are under way.
"use strict";

(() => {
  const { api, el, showError, stateBadge, progressBar, duration, jobSeconds, labelTags, when, timeEl, pathEl, TERMINAL } =
    Recast;
  const params = new URLSearchParams(location.search);
  const tbody = document.querySelector("#jobs tbody");
  const errorBox = document.getElementById("error");
  const empty = document.getElementById("empty");
  const more = document.getElementById("more");
  const refreshed = document.getElementById("refreshed");
  let cursor = null;
  let extraPages = false;
  let timer = null;

  function query(after) {
    const q = new URLSearchParams();
    if (params.get("state")) q.set("state", params.get("state"));
    if (params.get("label")) q.set("label", params.get("label"));
    q.set("limit", "50");
    if (after) q.set("cursor", after);
    return "/v1/jobs?" + q.toString();
  }

  // A running job's throughput and time left (the API gives them only while it is moving).
  function rateLine(job) {
    const p = job.progress || {};
    if (p.throughput_bytes_s === null || p.throughput_bytes_s === undefined) return null;
    const left = p.eta_s === null || p.eta_s === undefined ? "" : " · " + duration(p.eta_s) + " left";
    return el("span", { class: "sub rate", text: Recast.rate(p.throughput_bytes_s) + left });
  }

  function row(job) {
    const req = job.request || {};
    const link = el("a", { href: "/jobs/" + encodeURIComponent(job.id), class: "mono", text: job.id });
    return el("tr", { dataset: { job: job.id, state: job.state } },
      el("td", {}, link, timeEl(job.created_at, undefined, { class: "sub" })),
      el("td", {}, stateBadge(job.state),
        job.error ? el("span", { class: "sub", title: job.error.message, text: job.error.code }) : null),
      el("td", { class: "locations" },
        pathEl(req.source), el("span", { class: "to" }, el("span", { class: "arrow", text: "→" }), pathEl(req.target)),
        el("span", { class: "sub", text: "to " + (req.to || "?") + (req.dtype ? " · " + req.dtype : "") })),
      el("td", { text: job.adapter || req.adapter || "—" }),
      el("td", {}, progressBar(job), rateLine(job)),
      el("td", { class: "num", text: job.state === "queued" ? "—" : duration(jobSeconds(job)) }),
      el("td", {}, labelTags(job.labels)));
  }

  // The queue's depth and the fleet beside it, so a queued job's wait is explained.
  async function loadQueue() {
    const box = document.getElementById("queue");
    try {
      const { queue, workers } = await api("GET", "/v1/workers");
      const alive = workers.filter((w) => w.alive);
      const busy = alive.filter((w) => w.converting.length > 0).length;
      box.replaceChildren(
        el("span", { id: "queue-jobs", text: queue.jobs_queued + " jobs queued" }), " · ",
        el("span", { text: queue.jobs_active + " active" }), " · ",
        el("span", { id: "queue-units", text: queue.work_units_queued + " work units waiting" }), " · ",
        el("a", { href: "/workers", id: "queue-workers",
          text: alive.length + (alive.length === 1 ? " worker" : " workers") + " alive, " + busy + " converting" }));
    } catch (_) {
      box.textContent = "";
    }
  }

  async function load(append) {
    if (!append) loadQueue();
    try {
      const page = await api("GET", query(append ? cursor : null));
      showError(errorBox, null);
      if (!append) tbody.replaceChildren();
      for (const job of page.jobs) tbody.append(row(job));
      cursor = page.next_cursor;
      more.hidden = !cursor;
      empty.hidden = tbody.children.length > 0;
      refreshed.textContent = "updated " + when(new Date().toISOString());
      schedule(page.jobs);
    } catch (err) {
      showError(errorBox, err);
      schedule([]);
    }
  }

  // Refresh the first page every few seconds while something on it is still moving.
  function schedule(jobs) {
    clearTimeout(timer);
    const moving = jobs.some((j) => !TERMINAL.includes(j.state));
    if (!extraPages) timer = setTimeout(() => load(false), moving ? 2000 : 10000);
  }

  more.addEventListener("click", () => { extraPages = true; load(true); });
  load(false);
})();
