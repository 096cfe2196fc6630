"""The internal dashboard: a few server-rendered pages over the /v1 API, behind the same tokens.

A person signs in with an API token, checked once: the browser gets a session (``core.sessions``), an
opaque id in an HttpOnly, SameSite=Strict cookie that expires with it, never the token. The API accepts
that cookie as well as a bearer token, so the pages' JavaScript calls the JSON API with plain ``fetch``
and follows a job live with ``EventSource`` (which cannot send headers); what the cookie asks to change
must come from these pages (``service.deps.same_origin``). The server renders
only the frame of each page (header, forms, empty tables); the data comes from the API in the browser,
written with ``textContent`` only. Everything the server itself puts into a page is escaped. No build
step: the scripts and the stylesheet are plain files under ``service/static``.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from core.sessions import Sessions
from core.states import STATES
from service.deps import SESSION_COOKIE, same_origin

STATIC = Path(__file__).resolve().parent / "static"
_JOB_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_MAX_FORM_BYTES = 16 * 1024
_SECURITY_HEADERS = {
    # No inline script or style anywhere: a value that slipped through escaping still cannot run.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_NAV = (
    ("jobs", "/", "Jobs"),
    ("new", "/jobs/new", "New job"),
    ("workers", "/workers", "Workers"),
    ("schedules", "/schedules", "Schedules"),
)


def e(value: object) -> str:
    """Escape for HTML text and double-quoted attributes."""
    return html.escape(str(value), quote=True)


def _static_version() -> str:
    h = hashlib.sha256()
    for p in sorted(STATIC.glob("*")):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def _safe_next(raw: str | None) -> str:
    """A local path to return to after signing in; anything else (another host, a scheme) becomes ``/``."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return "/"
    if any(ord(c) < 0x20 or c == "\x7f" for c in raw) or urlsplit(raw).netloc:
        return "/"
    return raw


def install(app: FastAPI, sessions: Sessions) -> None:
    """Add the dashboard's pages, its sign-in and the static files to ``app``."""
    version = _static_version()

    def asset(name: str) -> str:
        return f"/static/{name}?v={version}"

    def page(
        title: str, body: str, *, active: str = "", scripts: Iterable[str] = (), status: int = 200,
        signed_in: bool = True, data: dict[str, str] | None = None,
    ) -> HTMLResponse:  # fmt: skip
        nav = ""
        if signed_in:
            links = "".join(
                f'<a href="{href}"{" class=active aria-current=page" if key == active else ""}>{label}</a>'
                for key, href, label in _NAV
            )
            nav = (
                f'<nav class="nav">{links}</nav>'
                '<form method="post" action="/logout" class="logout"><button type="submit" class="link">'
                "Log out</button></form>"
            )
        attrs = "".join(f' data-{k}="{e(v)}"' for k, v in (data or {}).items())
        tags = "".join(f'<script src="{asset(s)}" defer></script>' for s in ("common.js", *scripts))
        doc = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · Recast</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{asset("dashboard.css")}">
{tags}
</head>
<body{attrs}>
<header class="top"><a class="brand" href="/">Recast</a>{nav}</header>
<main>
{body}
</main>
</body>
</html>
"""
        return HTMLResponse(doc, status_code=status, headers=_SECURITY_HEADERS)

    def signed_in(request: Request) -> bool:
        return sessions.check(request.cookies.get(SESSION_COOKIE))

    def to_login(request: Request) -> RedirectResponse:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target = "/login" if here == "/" else f"/login?next={quote(here, safe='')}"
        return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------------------------- sign-in

    def login_form(next_path: str, error: str = "", status: int = 200) -> HTMLResponse:
        alert = f'<p class="alert error" role="alert">{e(error)}</p>' if error else ""
        body = f"""
<section class="card narrow">
  <h1>Sign in</h1>
  <p class="muted">Use a Recast API token (one of <code>RECAST_API_TOKENS</code>).</p>
  {alert}
  <form method="post" action="/login" class="stack" id="login-form">
    <input type="hidden" name="next" value="{e(next_path)}">
    <label>API token
      <input type="password" name="token" id="token" autocomplete="current-password" required autofocus>
    </label>
    <button type="submit" class="primary">Sign in</button>
  </form>
</section>"""
        return page("Sign in", body, status=status, signed_in=False)

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str | None = None) -> Response:
        if signed_in(request):
            return RedirectResponse(_safe_next(next), status_code=303)
        return login_form(_safe_next(next))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        # A request without Origin or Sec-Fetch-Site (not a browser) carries the token itself: nothing to
        # forge. A browser's, from another site, is refused.
        if not same_origin(request, unstated=True):
            return login_form("/", "This sign-in came from another site and was refused (behind a proxy, "
                              "pass the original Host header on).", 403)  # fmt: skip
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > _MAX_FORM_BYTES:
                return login_form("/", "The form was too large.", 413)
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        token = (form.get("token") or [""])[0].strip()
        next_path = _safe_next((form.get("next") or [""])[0])
        session_id = sessions.start(token) if token else None
        if session_id is None:
            return login_form(next_path, "That token is not valid.", 401)
        sessions.end(request.cookies.get(SESSION_COOKIE))  # a browser holds one session at a time
        resp = RedirectResponse(next_path, status_code=303, headers={"Cache-Control": "no-store"})
        resp.set_cookie(SESSION_COOKIE, session_id, max_age=sessions.ttl_s, httponly=True, samesite="strict",
                        path="/", secure=request.url.scheme == "https")  # fmt: skip
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        resp = RedirectResponse("/login", status_code=303, headers={"Cache-Control": "no-store"})
        if same_origin(request, unstated=True):
            sessions.end(request.cookies.get(SESSION_COOKIE))
            resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")  # fmt: skip
        return resp

    # --------------------------------------------------------------------------------------- pages

    @app.get("/", include_in_schema=False)
    def jobs_page(request: Request, state: str = "", label: str = "") -> Response:
        if not signed_in(request):
            return to_login(request)
        options = "".join(
            f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>' for s in STATES
        )
        body = f"""
<div class="title-row"><h1>Jobs</h1><a class="button primary" href="/jobs/new">New job</a></div>
<form class="filters" method="get" action="/" id="filters">
  <label>State
    <select name="state" id="filter-state"><option value="">any</option>{options}</select>
  </label>
  <label>Label
    <input name="label" id="filter-label" value="{e(label)}" placeholder="key=value" autocomplete="off">
  </label>
  <button type="submit">Filter</button>
  <a href="/" class="button subtle">Clear</a>
  <span class="live-note muted" id="refreshed"></span>
</form>
<p class="queue muted" id="queue" aria-live="polite"></p>
<div id="error" class="alert error" role="alert" hidden></div>
<table class="jobs" id="jobs">
  <thead><tr><th>Job</th><th>State</th><th>Source → target</th><th>Adapter</th><th>Progress</th>
  <th class="num">Duration</th><th>Labels</th></tr></thead>
  <tbody></tbody>
</table>
<p id="empty" class="muted empty" hidden>No jobs match. <a href="/jobs/new">Submit one.</a></p>
<p><button type="button" id="more" hidden>Load more</button></p>"""
        return page("Jobs", body, active="jobs", scripts=["jobs.js"], data={"page": "jobs"})

    @app.get("/jobs/new", include_in_schema=False)
    def new_job_page(request: Request) -> Response:
        if not signed_in(request):
            return to_login(request)
        body = f"""
<h1>New job</h1>
<div class="columns">
<form id="job-form" class="card stack" novalidate>
  {_input("Source", "source", "file:///data/model, s3://bucket/prefix or hf://org/repo@rev", required=True)}
  {_input("Target", "target", "an empty location", required=True)}
  <div class="row">
    {_select("Convert to", "to", TO_CHOICES)}
    {_select("Adapter", "adapter", [("", "detect")])}
  </div>
  <div class="row">
    {_select("Dtype", "dtype", DTYPES)}
    {_select("Quantize (to hf)", "quantize", QUANTIZE)}
    <label class="check"><input type="checkbox" name="verify" id="verify" checked> Verify</label>
  </div>
  {_input("Labels", "labels", "team=nlp, run=42")}
  <details>
    <summary>Credentials and Hub options</summary>
    <div class="stack">
      <div class="row">
        {_input("Source credential", "source_credential", "configured name")}
        {_input("Target credential", "target_credential", "configured name")}
      </div>
      {_input("Commit message (hf:// targets)", "commit_message", "", extra='maxlength="1000"')}
      <label class="check"><input type="checkbox" name="create_pr" id="create_pr">
        Open a pull request instead of committing</label>
    </div>
  </details>
  <div id="submit-error" class="alert error" role="alert" hidden></div>
  <div class="actions">
    <button type="button" id="preview-button">Preview</button>
    <button type="submit" class="primary" id="submit-button">Submit job</button>
  </div>
</form>
<section class="card" id="preview" aria-live="polite">
  <h2>Preflight</h2>
  <p class="muted" id="preview-hint">Enter a source and press Preview: the checkpoint's headers are read to
  show its adapter, quantization, size and what the conversion will write.</p>
  <div id="preview-body"></div>
</section>
</div>"""
        return page("New job", body, active="new", scripts=["new.js"], data={"page": "new"})

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(request: Request, job_id: str) -> Response:
        if not signed_in(request):
            return to_login(request)
        if not _JOB_ID.match(job_id):
            return page("No such job", f'<p class="alert error">No job {e(job_id)}.</p>', status=404)
        body = f"""
<div class="title-row">
  <h1>Job <code id="job-id">{e(job_id)}</code> <span id="state" class="badge">…</span></h1>
  <div class="actions">
    <span id="live" class="live muted" title="live updates from the event stream">connecting…</span>
    <button type="button" id="cancel" class="danger" hidden>Cancel job</button>
  </div>
</div>
<div id="error" class="alert error" role="alert" hidden></div>
<section class="card error-panel" id="error-panel" hidden>
  <h2>Error</h2>
  <p><code id="error-code"></code></p>
  <pre id="error-message" class="wrap"></pre>
</section>
<div class="columns">
  <section class="card">
    <h2>Overview</h2>
    <dl class="facts" id="facts"></dl>
  </section>
  <section class="card">
    <h2>Progress</h2>
    <div class="bar big" id="bar"><div class="fill"></div></div>
    <p id="step" class="muted"></p>
    <div class="figures" id="rate">
      <div class="figure"><div class="value" id="throughput">—</div><div class="name">throughput (source)</div></div>
      <div class="figure"><div class="value" id="time-left">—</div><div class="name">time left (reading)</div></div>
    </div>
    <figure class="chart" id="throughput-chart" aria-label="throughput over time">
      <svg viewBox="0 0 600 150" role="img"></svg>
      <figcaption class="muted" id="throughput-caption">Throughput over time appears once shards are
      converting.</figcaption>
    </figure>
    <table class="compact" id="shards"><thead><tr><th>Shard</th><th>Status</th><th></th></tr></thead>
    <tbody></tbody></table>
    <h3>Timeline</h3>
    <ol class="timeline" id="timeline"></ol>
  </section>
</div>
<section class="card" id="report">
  <h2>Verification report</h2>
  <p class="muted" id="report-status">The report is written after verification.</p>
  <div id="report-body" hidden>
    <div class="figures" id="report-summary"></div>
    <div id="report-problems"></div>
    <h3>Key accounting</h3>
    <div class="accounting" id="report-accounting"></div>
    <h3>Tensors</h3>
    <div class="filters">
      <label>Find <input id="tensor-filter" placeholder="key contains…" autocomplete="off"></label>
      <label class="check"><input type="checkbox" id="tensor-failed"> failed only</label>
      <span class="muted" id="tensor-count"></span>
    </div>
    <div class="scroll"><table class="compact tensors" id="report-table">
      <thead><tr><th>Tensor</th><th>Check</th><th>Result</th><th class="num">Max abs error</th>
      <th class="num">SNR dB</th><th class="num">Of e4m3 bound</th><th>Detail</th></tr></thead>
      <tbody></tbody>
    </table></div>
    <p><button type="button" id="tensor-more" hidden>Show more</button></p>
    <details><summary>Files (SHA-256)</summary>
      <table class="compact" id="report-files"><tbody></tbody></table></details>
  </div>
</section>"""
        data = {"page": "job", "job": job_id}
        return page(f"Job {job_id}", body, active="jobs", scripts=["job.js"], data=data)

    @app.get("/workers", include_in_schema=False)
    def workers_page(request: Request) -> Response:
        if not signed_in(request):
            return to_login(request)
        body = """
<div class="title-row"><h1>Workers</h1><span class="live-note muted" id="refreshed"></span></div>
<div id="error" class="alert error" role="alert" hidden></div>
<div class="figures" id="fleet">
  <div class="figure"><div class="value" id="workers-alive">—</div><div class="name">workers alive</div></div>
  <div class="figure"><div class="value" id="workers-busy">—</div>
    <div class="name">shards converting, of slots</div></div>
  <div class="figure"><div class="value" id="fleet-throughput">—</div>
    <div class="name">throughput, all workers</div></div>
  <div class="figure"><div class="value" id="jobs-queued">—</div><div class="name">jobs queued</div></div>
  <div class="figure"><div class="value" id="units-queued">—</div><div class="name">work units waiting</div></div>
</div>
<table class="workers" id="workers">
  <thead><tr><th>Worker</th><th>State</th><th>Device</th><th>Converting</th><th class="num">Throughput</th>
  <th class="num">Read</th><th class="num">Shards done</th><th>Last heartbeat</th></tr></thead>
  <tbody></tbody>
</table>
<p id="empty" class="muted empty" hidden>No worker has reported in the last 15 minutes. Start one with
<code>recast worker</code>.</p>"""
        return page("Workers", body, active="workers", scripts=["workers.js"], data={"page": "workers"})

    @app.get("/schedules", include_in_schema=False)
    def schedules_page(request: Request) -> Response:
        if not signed_in(request):
            return to_login(request)
        target = _input("Target (with {name} or {revision})", "target", "s3://bucket/native/{name}",
                        required=True, prefix="s-")  # fmt: skip
        body = f"""
<h1>Schedules</h1>
<div id="error" class="alert error" role="alert" hidden></div>
<table class="schedules" id="schedules">
  <thead><tr><th>Name</th><th>Cron (UTC)</th><th>Source → target</th><th>State</th><th>Next run</th>
  <th>Last run</th><th></th></tr></thead>
  <tbody></tbody>
</table>
<p id="empty" class="muted empty" hidden>No schedules yet. Each firing converts the newest checkpoint its
source finds, once per source revision.</p>
<form id="schedule-form" class="card stack">
  <fieldset id="schedule-fields" class="stack">
  <h2>New schedule</h2>
  <div class="row">
    {_input("Name", "name", "nightly-mistral", required=True, prefix="s-")}
    {_input("Cron (UTC)", "cron", "0 3 * * *", required=True, prefix="s-")}
  </div>
  <div class="row">
    {_input("Source", "source", "hf://org/repo, or an s3:// or file:// prefix", required=True, prefix="s-")}
    {_input("Source pattern (prefixes)", "source_pattern", "step-*", prefix="s-")}
  </div>
  {target}
  <div class="row">
    {_select("Convert to", "to", TO_CHOICES, prefix="s-")}
    {_select("Adapter", "adapter", [("", "detect")], prefix="s-")}
    {_select("Dtype", "dtype", DTYPES, prefix="s-")}
    {_select("Quantize (to hf)", "quantize", QUANTIZE, prefix="s-")}
  </div>
  {_input("Labels", "labels", "team=nlp", prefix="s-")}
  <div id="schedule-error" class="alert error" role="alert" hidden></div>
  <div class="actions"><button type="submit" class="primary">Create schedule</button></div>
  </fieldset>
</form>"""
        data = {"page": "schedules"}
        return page("Schedules", body, active="schedules", scripts=["schedules.js"], data=data)

    if not any(getattr(r, "path", None) == "/static" for r in app.routes):
        app.mount("/static", StaticFiles(directory=STATIC), name="static")


TO_CHOICES = [("native", "native (NeMo AutoModel)"), ("hf", "hf (Hugging Face safetensors)")]
DTYPES = [(v, v) for v in ("bf16", "fp32", "fp16")]
QUANTIZE = [(v, v) for v in ("keep", "none", "per-tensor", "block")]


def _input(
    label: str, name: str, placeholder: str, *, required: bool = False, prefix: str = "", extra: str = ""
) -> str:
    req = " required" if required else ""
    return (
        f'<label>{e(label)} <input name="{e(name)}" id="{e(prefix + name)}" placeholder="{e(placeholder)}"'
        f' autocomplete="off"{req} {extra}></label>'
    )


def _select(label: str, name: str, options: Iterable[tuple[str, str]], *, prefix: str = "") -> str:
    opts = "".join(f'<option value="{e(v)}">{e(text)}</option>' for v, text in options)
    return f'<label>{e(label)} <select name="{e(name)}" id="{e(prefix + name)}">{opts}</select></label>'
