// Workers: every worker heard from lately, alive or not, what each converts and how fast, and the queue.
// Refreshed every two seconds from GET /v1/workers (the workers' own heartbeats and progress in Redis).
"use strict";

(() => {
  const { api, el, showError, bytes, rate, ago, when, duration } = Recast;
  const $ = (id) => document.getElementById(id);
  const tbody = document.querySelector("#workers tbody");

  function row(w) {
    const cur = w.current;
    const converting = cur
      ? el("span", {},
        el("a", { href: "/jobs/" + encodeURIComponent(cur.job_id), class: "mono job-link", text: cur.job_id }),
        el("span", { class: "sub mono shard", text: cur.shard }),
        el("span", { class: "sub", text: "for " + duration((Date.now() - Date.parse(cur.started_at)) / 1000) }))
      : el("span", { class: "muted", text: w.alive ? "idle" : "—" });
    return el("tr", { dataset: { worker: w.name, alive: String(w.alive), busy: String(!!cur) } },
      el("td", {}, el("span", { class: "mono", text: w.name }),
        el("span", { class: "sub", text: w.host + " · pid " + w.pid })),
      el("td", {}, el("span", { class: "badge " + (w.alive ? (cur ? "state-running" : "ok") : "bad"),
        text: w.alive ? (cur ? "converting" : "idle") : "not responding" })),
      el("td", { class: "device", text: w.device || "—" }),
      el("td", { class: "current" }, converting),
      el("td", { class: "num throughput", text: cur ? rate(cur.throughput_bytes_s) : "—" }),
      el("td", { class: "num", text: cur ? bytes(cur.bytes_in) : "—" }),
      el("td", { class: "num", text: String(w.shards_done) }),
      el("td", {}, el("span", { class: "heartbeat", title: when(w.last_heartbeat), text: ago(w.last_heartbeat) })));
  }

  async function load() {
    try {
      const fleet = await api("GET", "/v1/workers");
      showError($("error"), null);
      tbody.replaceChildren(...fleet.workers.map(row));
      $("empty").hidden = fleet.workers.length > 0;
      const alive = fleet.workers.filter((w) => w.alive);
      const busy = alive.filter((w) => w.current);
      $("workers-alive").textContent = alive.length + " of " + fleet.workers.length;
      $("workers-busy").textContent = String(busy.length);
      $("fleet-throughput").textContent = rate(busy.reduce((sum, w) => sum + w.current.throughput_bytes_s, 0));
      $("jobs-queued").textContent = String(fleet.queue.jobs_queued);
      $("units-queued").textContent = String(fleet.queue.work_units_queued);
      $("refreshed").textContent = "updated " + when(new Date().toISOString());
    } catch (err) {
      showError($("error"), err);
    }
    setTimeout(load, 2000);
  }

  load();
})();
