// Workers: every worker heard from lately, alive or not, what each converts and how fast, and the queue.
// Refreshed every two seconds from GET /v1/workers (the workers' own heartbeats and progress in Redis).
"use strict";

(() => {
  const { api, el, showError, bytes, rate, ago, when, duration } = Recast;
  const $ = (id) => document.getElementById(id);
  const tbody = document.querySelector("#workers tbody");

  // One line per shard in flight: a worker converts up to `slots` shards at once, one per pool process.
  function unitLine(u) {
    return el("div", { class: "unit", dataset: { slot: String(u.slot) } },
      el("a", { href: "/jobs/" + encodeURIComponent(u.job_id), class: "mono job-link", text: u.job_id }),
      el("span", { class: "sub mono shard", text: u.shard }),
      el("span", { class: "sub", text: "for " + duration((Date.now() - Date.parse(u.started_at)) / 1000) }));
  }

  const sum = (units, field) => units.reduce((total, u) => total + u[field], 0);

  function row(w) {
    const units = w.converting;
    const busy = units.length > 0;
    const converting = busy ? units.map(unitLine) : [el("span", { class: "muted", text: w.alive ? "idle" : "—" })];
    return el("tr", { dataset: { worker: w.name, alive: String(w.alive), busy: String(busy) } },
      el("td", {}, el("span", { class: "mono", text: w.name }),
        el("span", { class: "sub", text: w.host + " · pid " + w.pid })),
      el("td", {}, el("span", { class: "badge " + (w.alive ? (busy ? "state-running" : "ok") : "bad"),
        text: w.alive ? (busy ? "converting" : "idle") : "not responding" }),
        el("span", { class: "sub slots", text: units.length + " of " + w.slots + " slots" })),
      el("td", { class: "device", text: w.device || "—" }),
      el("td", { class: "current" }, ...converting),
      el("td", { class: "num throughput", text: busy ? rate(sum(units, "throughput_bytes_s")) : "—" }),
      el("td", { class: "num", text: busy ? bytes(sum(units, "bytes_in")) : "—" }),
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
      const units = alive.flatMap((w) => w.converting);
      $("workers-alive").textContent = alive.length + " of " + fleet.workers.length;
      $("workers-busy").textContent = units.length + " of " + alive.reduce((total, w) => total + w.slots, 0);
      $("fleet-throughput").textContent = rate(sum(units, "throughput_bytes_s"));
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
