// Job detail: follows the job live through its event stream (EventSource; the session cookie
// authenticates), and shows the timeline, per-shard progress, errors and the verification report.
"use strict";

(() => {
  const R = Recast;
  const { api, el, showError, stateBadge, TERMINAL, CANCELLABLE } = R;
  const jobId = document.body.dataset.job;
  const base = "/v1/jobs/" + encodeURIComponent(jobId);
  const $ = (id) => document.getElementById(id);

  let job = null;
  let source = null;
  let reportLoaded = false;
  let eventCount = 0;
  const timeline = []; // [{state, at}]
  const shards = new Map(); // name -> "converting" | "converted"

  // ------------------------------------------------------------------------------------ rendering

  function fact(dl, name, value) {
    dl.append(el("dt", { text: name }), el("dd", {}, value instanceof Node ? value : String(value ?? "—")));
  }

  function renderFacts() {
    const req = job.request || {};
    const dl = $("facts");
    dl.replaceChildren();
    fact(dl, "Source", R.pathEl(req.source, { id: "source-location" }));
    if (job.source_revision) fact(dl, "Source revision", R.pathEl(job.source_revision));
    fact(dl, "Target", R.pathEl(req.target, { id: "target-location" }));
    const result = job.result || {};
    for (const [k, v] of Object.entries(result)) {
      const value = String(v);
      const node = /^https?:\/\//.test(value)
        ? el("a", { href: value, rel: "noopener noreferrer", class: "path mono", title: value, text: value })
        : R.pathEl(value);
      fact(dl, "Result " + k, node);
    }
    fact(dl, "Conversion", "to " + (req.to || "?") + " · dtype " + (req.dtype || "bf16") +
      (req.to === "hf" ? " · quantize " + (req.quantize || "keep") : "") + (req.verify === false ? " · not verified" : ""));
    fact(dl, "Adapter", job.adapter || req.adapter || "detected when planned");
    fact(dl, "Labels", R.labelTags(job.labels).length ? el("span", {}, R.labelTags(job.labels)) : "—");
    fact(dl, "Created", R.timeEl(job.created_at));
    fact(dl, "Started", job.started_at ? R.timeEl(job.started_at) : "—");
    fact(dl, "Finished", job.finished_at ? R.timeEl(job.finished_at) : "—");
    fact(dl, "Duration", el("span", { id: "duration", text: durationText() }));
    const p = job.progress || {};
    fact(dl, "Read", R.bytes(p.bytes_in) + " of " + R.bytes(p.bytes_total));
    fact(dl, "Written", R.bytes(p.bytes_out));
  }

  function durationText() {
    return job.state === "queued" ? "—" : R.duration(R.jobSeconds(job));
  }

  function renderState() {
    const badge = $("state");
    badge.replaceWith(Object.assign(stateBadge(job.state), { id: "state" }));
    document.title = "Job " + jobId + " (" + job.state + ") · Recast";
    // Only a job that can still be cancelled has the button; a finished one has none.
    const cancel = $("cancel");
    cancel.hidden = !CANCELLABLE.includes(job.state);
    cancel.disabled = cancel.hidden;
    const panel = $("error-panel");
    if (job.error) {
      $("error-code").textContent = job.error.code;
      $("error-message").textContent = job.error.message;
      panel.hidden = false;
    } else {
      panel.hidden = true;
    }
  }

  function renderProgress() {
    const p = job.progress || {};
    R.setBar($("bar"), job);
    const { label } = R.progressOf(job);
    $("step").textContent = (p.step ? p.step + " · " : "") + label;
    const tbody = document.querySelector("#shards tbody");
    tbody.replaceChildren();
    const named = [...shards.keys()].sort();
    const total = Math.max(p.shards_total || 0, named.length);
    const finished = TERMINAL.includes(job.state);
    const row = (name, status, nameCell) => {
      if (job.state === "succeeded" || (status === "converting" && p.shards_done === total && total)) status = "converted";
      if (status === "converting" && finished) status = "stopped";
      if (status === "pending" && finished) status = "not converted";
      const bar = el("div", { class: "bar" }, el("div", { class: "fill" }));
      bar.classList.toggle("done", status === "converted");
      bar.classList.toggle("busy", status === "converting");
      bar.firstElementChild.style.width = status === "converted" || status === "converting" ? "100%" : "0";
      tbody.append(el("tr", { dataset: name ? { shard: name, status } : { status } },
        nameCell || el("td", { class: "key", text: name }), el("td", { text: status }), el("td", {}, bar)));
    };
    for (const name of named) row(name, shards.get(name));
    // A shard's name arrives with its first event: the others are counted, not named. Those the job
    // counts as done but the stream never named (its history expired) are converted; the rest pending.
    const unnamed = total - named.length;
    const convertedNamed = named.filter((n) => shards.get(n) === "converted").length;
    const doneUnnamed = Math.min(unnamed, Math.max(0, (p.shards_done || 0) - convertedNamed));
    const count = (n, what) => el("td", { class: "muted", title: "shards are named when a worker starts them",
      text: n + (n === 1 ? " shard" : " shards") + " " + what });
    if (doneUnnamed) row("", "converted", count(doneUnnamed, "done"));
    if (unnamed - doneUnnamed) row("", "pending", count(unnamed - doneUnnamed, "not started"));
    if (!total) tbody.append(el("tr", {}, el("td", { colspan: 3, class: "muted", text: "not planned yet" })));
  }

  // Throughput and time left come with every event (null unless the job is running and moving).
  function renderRate() {
    const p = job.progress || {};
    $("throughput").textContent = R.rate(p.throughput_bytes_s);
    $("time-left").textContent = p.eta_s === null || p.eta_s === undefined ? "—" : R.duration(p.eta_s);
  }

  // ------------------------------------------------------------------------------ throughput chart

  const SVG = "http://www.w3.org/2000/svg";
  const W = 600, H = 150, LEFT = 64, BOTTOM = 20, TOP = 8;
  let chartTimer = null;

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Source bytes per second between samples, as a line over the job's time; axes in MB/s and minutes.
  function drawChart(points) {
    const box = document.querySelector("#throughput-chart svg");
    const rated = points.filter((p) => p.bytes_per_s !== null);
    const chart = $("throughput-chart");
    chart.dataset.points = String(rated.length);
    if (rated.length < 1) { box.replaceChildren(); return; }
    const t0 = Date.parse(points[0].at);
    const t1 = Math.max(Date.parse(points[points.length - 1].at), t0 + 1000);
    const top = Math.max(...rated.map((p) => p.bytes_per_s), 1) * 1.15; // headroom above the peak
    const x = (iso) => LEFT + ((Date.parse(iso) - t0) / (t1 - t0)) * (W - LEFT - 4);
    const y = (v) => TOP + (1 - v / top) * (H - TOP - BOTTOM);
    // Each rate holds from the previous sample to its own: a step line, honest about the sampling.
    const coords = [];
    rated.forEach((p) => {
      const i = points.indexOf(p);
      coords.push(x(points[i - 1].at).toFixed(1) + "," + y(p.bytes_per_s).toFixed(1));
      coords.push(x(p.at).toFixed(1) + "," + y(p.bytes_per_s).toFixed(1));
    });
    const base = y(0).toFixed(1);
    const first = coords[0].split(",")[0], last = coords[coords.length - 1].split(",")[0];
    box.replaceChildren(
      svg("line", { class: "axis", x1: LEFT, y1: base, x2: W - 4, y2: base }),
      svg("line", { class: "axis", x1: LEFT, y1: TOP, x2: LEFT, y2: base }),
      svg("line", { class: "grid", x1: LEFT, y1: y(top / 2), x2: W - 4, y2: y(top / 2) }),
      svg("polygon", { class: "area", points: first + "," + base + " " + coords.join(" ") + " " + last + "," + base }),
      svg("polyline", { class: "line", points: coords.join(" ") }),
      svg("text", { class: "label", x: LEFT - 6, y: TOP + 10, "text-anchor": "end" }, R.rate(top)),
      svg("text", { class: "label", x: LEFT - 6, y: y(top / 2) + 4, "text-anchor": "end" }, R.rate(top / 2)),
      svg("text", { class: "label", x: LEFT - 6, y: H - BOTTOM, "text-anchor": "end" }, "0"),
      svg("text", { class: "label", x: LEFT, y: H - 4 }, "0 s"),
      svg("text", { class: "label", x: W - 4, y: H - 4, "text-anchor": "end" }, R.duration((t1 - t0) / 1000)));
    const latest = rated[rated.length - 1].bytes_per_s;
    const mean = (points[points.length - 1].bytes_in - points[0].bytes_in) / ((t1 - t0) / 1000);
    $("throughput-caption").textContent = "Source bytes read per second, all workers together: latest " +
      R.rate(latest) + ", mean " + R.rate(mean) + ", " + points.length + " samples.";
  }

  async function loadChart() {
    clearTimeout(chartTimer);
    try {
      const got = await api("GET", base + "/throughput");
      drawChart(got.points);
    } catch (_) {
      // The chart waits for the next try; the rest of the page has its own error box.
    }
    if (job && !TERMINAL.includes(job.state)) chartTimer = setTimeout(loadChart, 3000);
  }

  function renderTimeline() {
    const ol = $("timeline");
    ol.replaceChildren();
    for (const [i, t] of timeline.entries()) {
      const next = timeline[i + 1];
      const spent = next ? (Date.parse(next.at) - Date.parse(t.at)) / 1000 : null;
      ol.append(el("li", { class: "state-" + t.state.replace(/[^a-z]/g, ""), dataset: { state: t.state } },
        el("strong", { text: t.state }), R.timeEl(t.at, undefined, { class: "when" }),
        spent !== null ? el("span", { class: "when", text: "(" + R.duration(spent) + ")" }) : null));
    }
  }

  function render() {
    renderState();
    renderFacts();
    renderProgress();
    renderRate();
    renderTimeline();
    if (!reportLoaded && (job.state === "succeeded" || job.state === "failed")) loadReport();
  }

  // ------------------------------------------------------------------------------------ the stream

  function apply(kind, data) {
    job = data;
    eventCount++;
    document.body.dataset.events = String(eventCount);
    const step = (data.progress && data.progress.step) || "";
    let m = /^converting (.+\.safetensors)$/.exec(step);
    if (m && shards.get(m[1]) !== "converted") shards.set(m[1], "converting");
    m = /^converted (.+)$/.exec(step);
    if (m) shards.set(m[1], "converted");
    if (kind === "state") {
      const last = timeline[timeline.length - 1];
      if (!last || last.state !== data.state) timeline.push({ state: data.state, at: data.updated_at });
    }
  }

  function setLive(text, on) {
    const live = $("live");
    live.textContent = text;
    live.classList.toggle("on", !!on);
  }

  function follow() {
    if (!window.EventSource) return poll();
    source = new EventSource(base + "/events", { withCredentials: true });
    let pending = false;
    const handle = (kind) => (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch (_) { return; }
      apply(kind, data);
      setLive("live", true);
      if (kind === "state" && TERMINAL.includes(data.state)) {
        source.close();
        setLive("finished", false);
        render();
        loadChart();
        return;
      }
      // A replayed history arrives in a burst: draw once per frame.
      if (!pending) {
        pending = true;
        requestAnimationFrame(() => { pending = false; render(); });
      }
    };
    source.addEventListener("state", handle("state"));
    source.addEventListener("progress", handle("progress"));
    source.addEventListener("open", () => setLive("live", true));
    source.addEventListener("error", () => {
      if (job && TERMINAL.includes(job.state)) return;
      if (source.readyState === EventSource.CLOSED) {
        setLive("polling", false);
        poll();
      } else {
        setLive("reconnecting…", false);
      }
    });
  }

  // Without a stream (it failed, or the job record expired) the job is polled.
  async function poll() {
    try {
      job = await api("GET", base);
      showError($("error"), null);
      render();
      if (!TERMINAL.includes(job.state)) setTimeout(poll, 2000);
      else setLive("finished", false);
    } catch (err) {
      showError($("error"), err);
      setLive("offline", false);
    }
  }

  // ------------------------------------------------------------------------------------ cancelling

  R.confirmClick($("cancel"), "Really cancel?", async () => {
    const button = $("cancel");
    button.disabled = true;
    try {
      const got = await api("POST", base + "/cancel");
      showError($("error"), null);
      if (!source || source.readyState === EventSource.CLOSED) {
        job = got;
        render();
      }
    } catch (err) {
      showError($("error"), err);
      button.disabled = !(job && CANCELLABLE.includes(job.state));
    }
  });

  // --------------------------------------------------------------------------------------- report

  const PAGE = 200;
  let tensors = [];
  let shown = PAGE;

  function figure(name, value, cls) {
    return el("div", { class: "figure" + (cls ? " " + cls : "") },
      el("div", { class: "value", text: value }), el("div", { class: "name", text: name }));
  }

  function num(v, digits) {
    return v === null || v === undefined ? "—" : Number(v).toFixed(digits);
  }

  function pct(v) {
    return v === null || v === undefined ? "—" : (Number(v) * 100).toFixed(1) + "%";
  }

  async function loadReport() {
    reportLoaded = true;
    let rep;
    try {
      rep = await api("GET", base + "/report");
    } catch (err) {
      $("report-status").textContent = err.status === 404 ? err.detail : R.problemText(err);
      if (err.status !== 404) reportLoaded = false;
      return;
    }
    const s = rep.summary || {};
    const verdict = !s.verified ? "not verified" : s.passed ? "passed" : "failed";
    $("report-status").replaceChildren(
      el("span", { class: "badge " + (verdict === "passed" ? "ok" : verdict === "failed" ? "bad" : "warn"),
        id: "report-verdict", text: verdict }),
      " " + (rep.direction || "") + " with " + (rep.adapter || "?"));
    const tp = rep.throughput_gb_s || {};
    $("report-summary").replaceChildren(
      figure("tensors checked", String(s.tensors_checked ?? "—")),
      figure("bitwise equal", String(s.bitwise_equal ?? "—")),
      figure("within the FP8 bound", (s.bounded_within ?? "—") + " / " + (s.bounded ?? "—")),
      figure("worst fraction of e4m3 bound", pct(s.worst_bound_ratio)),
      figure("min SNR (dB)", num(s.min_snr_db, 1)),
      figure("read", R.bytes(rep.bytes_in)),
      figure("written", R.bytes(rep.bytes_out)),
      figure("seconds", num(rep.seconds, 1)),
      figure("GB/s in / out", num(tp.in, 3) + " / " + num(tp.out, 3)));
    const problems = [...(s.problems || [])];
    $("report-problems").replaceChildren(...(problems.length
      ? [el("div", { class: "alert error" }, el("strong", { text: "Problems" }),
        el("ul", {}, problems.map((p) => el("li", { text: p }))))]
      : []));
    const acc = rep.accounting || {};
    $("report-accounting").replaceChildren(...Object.entries(acc).map(([name, keys]) => {
      const list = el("ul", {}, keys.slice(0, 1000).map((k) => el("li", { class: "mono", text: k })));
      if (keys.length > 1000) list.append(el("li", { class: "muted", text: "… and " + (keys.length - 1000) + " more" }));
      return el("details", { class: name === "unaccounted" && keys.length ? "bad" : "", dataset: { category: name } },
        el("summary", { text: name + ": " + keys.length }), keys.length ? list : el("p", { class: "muted", text: "none" }));
    }));
    tensors = rep.tensors || [];
    const files = document.querySelector("#report-files tbody");
    files.replaceChildren(...Object.entries(rep.files || {}).sort().map(([name, sha]) =>
      el("tr", {}, el("td", { class: "key", text: name }), el("td", { class: "key", text: sha }))));
    $("report-body").hidden = false;
    drawTensors();
  }

  function drawTensors() {
    const needle = $("tensor-filter").value.trim().toLowerCase();
    const failedOnly = $("tensor-failed").checked;
    const match = tensors.filter((t) => (!failedOnly || !t.passed) && (!needle || t.key.toLowerCase().includes(needle)));
    const tbody = document.querySelector("#report-table tbody");
    tbody.replaceChildren(...match.slice(0, shown).map((t) => {
      const st = t.stats || {};
      return el("tr", { class: t.passed ? "" : "failed" },
        el("td", { class: "key", text: t.key }),
        el("td", { text: t.check }),
        el("td", {}, el("span", { class: "badge " + (t.passed ? "ok" : "bad"), text: t.passed ? "pass" : "fail" })),
        el("td", { class: "num", text: st.max_abs_error === undefined ? "—" : Number(st.max_abs_error).toExponential(2) }),
        el("td", { class: "num", text: st.snr_db === undefined ? "—" : num(st.snr_db, 1) }),
        el("td", { class: "num", text: st.worst_bound_ratio === undefined ? "—" : pct(st.worst_bound_ratio) }),
        el("td", { text: t.detail || "" }));
    }));
    $("tensor-count").textContent = Math.min(shown, match.length) + " of " + match.length + " shown";
    $("tensor-more").hidden = match.length <= shown;
  }

  $("tensor-filter").addEventListener("input", () => { shown = PAGE; drawTensors(); });
  $("tensor-failed").addEventListener("change", () => { shown = PAGE; drawTensors(); });
  $("tensor-more").addEventListener("click", () => { shown += PAGE * 5; drawTensors(); });

  // ------------------------------------------------------------------------------------------ start

  setInterval(() => {
    const d = $("duration");
    if (d && job && !TERMINAL.includes(job.state)) d.textContent = durationText();
  }, 1000);

  (async () => {
    try {
      job = await api("GET", base); // a missing job shows the API's problem instead of a silent stream
      render();
      loadChart();
    } catch (err) {
      showError($("error"), err);
      setLive("offline", false);
      return;
    }
    follow();
  })();
})();
