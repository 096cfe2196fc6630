// Schedules: list, create, pause or resume, delete, and each schedule's firings (/v1/schedules).
"use strict";

(() => {
  const R = Recast;
  const { api, el, showError } = R;
  const $ = (id) => document.getElementById(id);
  const tbody = document.querySelector("#schedules tbody");
  const errorBox = $("error");

  R.fillAdapters($("s-adapter"));

  function outcome(f) {
    if (f.error) return "failed";
    if (f.skipped_reason) return "skipped";
    return f.job_id ? "submitted" : "unknown";
  }

  function jobLink(id) {
    return el("a", { href: "/jobs/" + encodeURIComponent(id), class: "mono", text: id });
  }

  // A firing submitted a job, skipped (maybe naming the job that already converted it), or failed.
  function outcomeNode(f) {
    const kind = outcome(f);
    if (kind === "failed") return el("span", { class: "alert-text" }, el("span", { class: "badge bad", text: "failed" }),
      " ", f.error);
    if (kind === "skipped") return el("span", {}, el("span", { class: "badge warn", text: "skipped" }), " ",
      f.skipped_reason, f.job_id ? el("span", { class: "sub" }, "job ", jobLink(f.job_id)) : null);
    if (kind === "submitted") return el("span", {}, el("span", { class: "badge ok", text: "submitted" }), " ",
      jobLink(f.job_id));
    return el("span", { class: "muted", text: "—" });
  }

  function firingsRow(schedule, cols) {
    const cell = el("td", { colspan: cols }, el("p", { class: "muted", text: "Loading firings…" }));
    const row = el("tr", { class: "firings", dataset: { firings: schedule.id } }, cell);
    api("GET", "/v1/schedules/" + encodeURIComponent(schedule.id) + "/firings").then((data) => {
      const firings = (data && data.firings) || [];
      if (!firings.length) {
        cell.replaceChildren(el("p", { class: "muted", text: "No firings yet." }));
        return;
      }
      cell.replaceChildren(el("table", { class: "compact" },
        el("thead", {}, el("tr", {}, el("th", { text: "At" }), el("th", { text: "Outcome" }),
          el("th", { text: "Source" }), el("th", { text: "Source revision" }))),
        el("tbody", {}, firings.map((f) => el("tr", { dataset: { outcome: outcome(f) } },
          el("td", { class: "nowrap" }, R.timeEl(f.at, "UTC"),
            f.manual ? el("span", { class: "sub", text: "run by hand" }) : null),
          el("td", {}, outcomeNode(f)),
          el("td", { class: "locations" }, R.pathEl(f.source)),
          el("td", { class: "key", text: f.source_revision || "—" }))))));
    }).catch((err) => {
      cell.replaceChildren(el("div", { class: "alert error", text: R.problemText(err) }));
    });
    return row;
  }

  function row(s) {
    const t = s.template || {};
    const id = encodeURIComponent(s.id);
    const pause = el("button", { type: "button", class: "small", text: s.paused ? "Resume" : "Pause" });
    pause.addEventListener("click", async () => {
      pause.disabled = true;
      try {
        await api("PATCH", "/v1/schedules/" + id, { paused: !s.paused });
        showError(errorBox, null);
        await load();
      } catch (err) {
        showError(errorBox, err);
        pause.disabled = false;
      }
    });
    const del = el("button", { type: "button", class: "small danger", text: "Delete" });
    R.confirmClick(del, "Really delete?", async () => {
      del.disabled = true;
      try {
        await api("DELETE", "/v1/schedules/" + id);
        showError(errorBox, null);
        await load();
      } catch (err) {
        showError(errorBox, err);
        del.disabled = false;
      }
    });
    const run = el("button", { type: "button", class: "small", text: "Run now", title: "fire once now, also when paused" });
    run.addEventListener("click", async () => {
      run.disabled = true;
      try {
        await api("POST", "/v1/schedules/" + id + "/run");
        showError(errorBox, null);
        await load(s.id);
      } catch (err) {
        showError(errorBox, err);
      } finally {
        run.disabled = false;
      }
    });
    const toggle = el("button", { type: "button", class: "small", text: "Firings" });
    const tr = el("tr", { dataset: { schedule: s.id } },
      el("td", {}, el("strong", { text: s.name || s.id }), el("span", { class: "sub mono", text: s.id })),
      el("td", { class: "mono nowrap", text: s.cron || "" }),
      el("td", { class: "locations" },
        R.pathEl(t.source), el("span", { class: "to" }, el("span", { class: "arrow", text: "→" }), R.pathEl(t.target)),
        el("span", { class: "sub", text: (t.source_pattern ? "newest " + t.source_pattern + " · " : "") + "to " +
          (t.to || "?") + (t.adapter ? " · " + t.adapter : "") }),
        R.labelTags(t.labels)),
      el("td", {}, el("span", { class: "badge " + (s.paused ? "warn" : "ok"), text: s.paused ? "paused" : "active" })),
      el("td", { class: "nowrap next-run" }, s.paused || !s.next_run_at ? "—" : R.timeEl(s.next_run_at, "UTC")),
      el("td", { class: "nowrap last-run" }, s.last_run_at ? R.timeEl(s.last_run_at, "UTC") : "—"),
      el("td", {}, el("div", { class: "actions" }, toggle, run, pause, del)));
    toggle.addEventListener("click", () => {
      const open = tr.nextElementSibling && tr.nextElementSibling.classList.contains("firings")
        ? tr.nextElementSibling : null;
      if (open) open.remove();
      else tr.after(firingsRow(s, tr.children.length));
    });
    return tr;
  }

  // Reloads the list; the firings of ``openId`` (and of any schedule whose firings were open) stay open.
  async function load(openId) {
    const open = new Set([...tbody.querySelectorAll("tr.firings")].map((r) => r.dataset.firings));
    if (openId) open.add(openId);
    try {
      const data = await api("GET", "/v1/schedules");
      const schedules = (data && data.schedules) || [];
      tbody.replaceChildren();
      for (const s of schedules) {
        const tr = row(s);
        tbody.append(tr);
        if (open.has(s.id)) tbody.append(firingsRow(s, tr.children.length));
      }
      $("empty").hidden = schedules.length > 0;
      showError(errorBox, null);
    } catch (err) {
      tbody.replaceChildren();
      if (err.status === 404 || err.status === 405) {
        showError(errorBox, "Schedules are not available on this server. " + R.problemText(err));
        $("schedule-fields").disabled = true;
      } else {
        showError(errorBox, err);
      }
    }
  }

  $("schedule-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const box = $("schedule-error");
    const v = (id) => $(id).value.trim();
    let template;
    try {
      template = {
        source: v("s-source"), target: v("s-target"), to: $("s-to").value, dtype: $("s-dtype").value,
        quantize: $("s-quantize").value, labels: R.parseLabels($("s-labels").value),
      };
    } catch (err) {
      showError(box, err.message);
      return;
    }
    if (v("s-adapter")) template.adapter = v("s-adapter");
    if (v("s-source_pattern")) template.source_pattern = v("s-source_pattern");
    if (!v("s-name") || !v("s-cron") || !template.source || !template.target) {
      showError(box, "Name, cron, source and target are required.");
      return;
    }
    try {
      await api("POST", "/v1/schedules", { name: v("s-name"), cron: v("s-cron"), template });
      showError(box, null);
      $("schedule-form").reset();
      await load();
    } catch (err) {
      showError(box, err);
    }
  });

  load();
})();
