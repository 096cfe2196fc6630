// Recast dashboard: helpers shared by every page. Plain JavaScript, no build step.
// Every value from the API reaches the page through textContent or attribute setters, never innerHTML.
"use strict";

const Recast = (() => {
  const TERMINAL = ["succeeded", "failed", "cancelled"];
  const CANCELLABLE = ["queued", "running", "verifying"];

  class ApiError extends Error {
    constructor(status, code, detail, body) {
      super(detail);
      this.status = status;
      this.code = code;
      this.detail = detail;
      this.body = body;
    }
  }

  function toLogin() {
    const here = location.pathname + location.search;
    location.assign(here === "/" ? "/login" : "/login?next=" + encodeURIComponent(here));
  }

  // Calls the JSON API; the session cookie authenticates. Errors are the API's problem details.
  async function api(method, path, body, headers) {
    const opts = { method, credentials: "same-origin", headers: { Accept: "application/json", ...(headers || {}) } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (err) {
      throw new ApiError(0, "network_error", "The server could not be reached (" + err.message + ").", null);
    }
    const text = await resp.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = null; }
    }
    if (resp.status === 401) {
      toLogin();
    }
    if (!resp.ok) {
      const code = (data && data.code) || "http_error";
      const detail = (data && data.detail) || (resp.status + " " + resp.statusText);
      throw new ApiError(resp.status, code, detail, data);
    }
    return data;
  }

  function problemText(err) {
    if (err instanceof ApiError) {
      return err.code && err.code !== "http_error" ? err.code + ": " + err.detail : err.detail;
    }
    return String(err && err.message ? err.message : err);
  }

  // el("a", {href: "/x", class: "tag"}, "text", otherNode): text children become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function showError(node, err) {
    if (!node) return;
    if (err === null || err === undefined) {
      node.hidden = true;
      node.textContent = "";
      return;
    }
    node.textContent = typeof err === "string" ? err : problemText(err);
    node.hidden = false;
  }

  function bytes(n) {
    if (n === null || n === undefined || isNaN(n)) return "—";
    const units = ["B", "kB", "MB", "GB", "TB", "PB"];
    let v = Number(n);
    let i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)) + " " + units[i];
  }

  // "2026-12-03 03:00:00 UTC": a time always names its zone. Schedules' crons are UTC, so their times are
  // shown in UTC (zone "UTC"); the rest in the browser's own zone (zone undefined).
  function when(iso, zone) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (isNaN(d)) return String(iso);
    const fmt = new Intl.DateTimeFormat("en-US", {
      timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
      second: "2-digit", hourCycle: "h23", timeZoneName: "short",
    });
    const p = Object.fromEntries(fmt.formatToParts(d).map((part) => [part.type, part.value]));
    return p.year + "-" + p.month + "-" + p.day + " " + p.hour + ":" + p.minute + ":" + p.second + " " + p.timeZoneName;
  }

  // A <time> showing when(iso, zone), with the exact instant on hover.
  function timeEl(iso, zone, attrs) {
    return el("time", { ...(attrs || {}), datetime: iso || null, title: iso || null, text: when(iso, zone) });
  }

  // A location (file://, s3://, hf://) on one line, cut with an ellipsis when long; the whole on hover.
  function pathEl(location, attrs) {
    const text = location || "—";
    return el("span", { ...(attrs || {}), class: "path mono", title: location || null, text });
  }

  // "12.3 MB/s"; a dash where there is no rate.
  function rate(bytesPerSecond) {
    if (bytesPerSecond === null || bytesPerSecond === undefined || isNaN(bytesPerSecond)) return "—";
    return bytes(Math.round(bytesPerSecond)) + "/s";
  }

  // "4 s ago", from an ISO time.
  function ago(iso) {
    const t = Date.parse(iso);
    if (isNaN(t)) return "—";
    return duration(Math.max(0, (Date.now() - t) / 1000)) + " ago";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || isNaN(seconds) || seconds < 0) return "—";
    if (seconds < 10) return seconds.toFixed(1) + " s";
    const s = Math.round(seconds);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const r = s % 60;
    if (h) return h + " h " + String(m).padStart(2, "0") + " min";
    if (m) return m + " min " + String(r).padStart(2, "0") + " s";
    return r + " s";
  }

  // Seconds a job has run: from start (or creation) to finish, or to now while it is under way.
  function jobSeconds(job) {
    const start = Date.parse(job.started_at || job.created_at);
    if (isNaN(start)) return null;
    const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
    return (end - start) / 1000;
  }

  function stateBadge(state) {
    const safe = String(state || "unknown").replace(/[^a-z]/g, "");
    return el("span", { class: "badge state-" + safe, text: state || "unknown" });
  }

  // Fraction of the work done, and a short label, from a job's progress.
  function progressOf(job) {
    const p = job.progress || {};
    if (job.state === "succeeded") return { frac: 1, label: (p.shards_total ? p.shards_total + " shards" : "done") };
    const shards = p.shards_total ? p.shards_done + "/" + p.shards_total + " shards" : "";
    let frac = 0;
    if (p.bytes_total) frac = Math.min(1, p.bytes_in / p.bytes_total);
    else if (p.shards_total) frac = p.shards_done / p.shards_total;
    if (p.shards_total && p.shards_done === p.shards_total) frac = 1;
    const pct = Math.floor(frac * 100) + "%";
    return { frac, label: shards ? shards + " · " + pct : (job.state === "queued" ? "queued" : pct) };
  }

  function setBar(bar, job) {
    const { frac } = progressOf(job);
    bar.classList.toggle("done", job.state === "succeeded");
    bar.classList.toggle("failed", job.state === "failed");
    bar.classList.toggle("stopped", job.state === "cancelled" || job.state === "cancelling");
    bar.classList.toggle("busy", ["running", "verifying", "uploading"].includes(job.state));
    bar.firstElementChild.style.width = (frac * 100).toFixed(1) + "%";
  }

  function progressBar(job) {
    const bar = el("div", { class: "bar", role: "progressbar" }, el("div", { class: "fill" }));
    setBar(bar, job);
    const { frac, label } = progressOf(job);
    bar.setAttribute("aria-valuenow", String(Math.round(frac * 100)));
    return el("div", {}, bar, el("div", { class: "progress-label", text: label }));
  }

  // "team=nlp, run=42" (commas or new lines) -> {team: "nlp", run: "42"}; throws on a malformed pair.
  function parseLabels(text) {
    const out = {};
    for (const part of String(text || "").split(/[,\n]/)) {
      const item = part.trim();
      if (!item) continue;
      const at = item.indexOf("=");
      if (at <= 0) throw new Error("labels: expected key=value, got " + JSON.stringify(item));
      out[item.slice(0, at).trim()] = item.slice(at + 1).trim();
    }
    return out;
  }

  function labelTags(labels) {
    return Object.entries(labels || {}).map(([k, v]) =>
      el("a", { class: "tag", href: "/?label=" + encodeURIComponent(k + "=" + v), title: "jobs with this label" },
        k + "=" + v));
  }

  function randomKey() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  async function fillAdapters(select) {
    try {
      const adapters = await api("GET", "/v1/adapters");
      for (const a of adapters) select.append(el("option", { value: a.name, title: a.description, text: a.name }));
    } catch (_) {
      // The adapter stays "detect"; the API names the problem if a job needs one.
    }
  }

  // A destructive button asks once more: the first click arms it for a few seconds.
  function confirmClick(button, label, action) {
    const original = button.textContent;
    let timer = null;
    button.addEventListener("click", async () => {
      if (!button.classList.contains("armed")) {
        button.classList.add("armed");
        button.textContent = label;
        timer = setTimeout(() => { button.classList.remove("armed"); button.textContent = original; }, 5000);
        return;
      }
      clearTimeout(timer);
      button.classList.remove("armed");
      button.textContent = original;
      await action();
    });
  }

  return {
    TERMINAL, CANCELLABLE, ApiError, api, problemText, el, showError, bytes, rate, ago, when, timeEl, pathEl, duration,
    jobSeconds, stateBadge, progressOf, setBar, progressBar, parseLabels, labelTags, randomKey, fillAdapters, confirmClick,
  };
})();
