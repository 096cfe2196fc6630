"""The dashboard. Without a browser: the pages, sign-in and its session cookie, the guard and the
escaping, on a bare app. In a real browser (headless Chromium driven by Playwright) against the real
service: sign in (a session, ended at sign-out), submit through the form after a preflight preview,
follow the job live to the end, read its report, and cancel a running job; the workers, a running
job's throughput and time left, the queue's depth; a page on another port of the same host cannot use
the session; pending shards, times with their zone, exact cron times, long paths; the API docs with no
network beyond the service. Screenshots go to ``$RECAST_ARTIFACTS/dashboard``."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from harness import TOKEN, Service, submit, wait

from core.embedded import EmbeddedRedis
from core.jobstore import JobStore
from core.sessions import Sessions
from service import dashboard
from service.deps import SESSION_COOKIE as COOKIE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

if sync_playwright is None:
    _NO_BROWSER = "playwright is not installed (pip install playwright; never `playwright install`)"
elif not os.access(CHROMIUM, os.X_OK):
    _NO_BROWSER = "no chromium (apt-get install -y chromium)"
else:
    _NO_BROWSER = ""
needs_browser = pytest.mark.skipif(bool(_NO_BROWSER), reason=_NO_BROWSER)

ARTIFACTS = Path(os.environ.get("RECAST_ARTIFACTS", "test-artifacts")) / "dashboard"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# The browser's zone is not UTC, so a time shown without its zone, or in the wrong one, is caught.
BROWSER_ZONE = "America/New_York"
LOCAL_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d E[SD]T$")


# ------------------------------------------------------------------------------------ without a browser


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sessions]:
    with EmbeddedRedis(tmp_path_factory.mktemp("dashboard-redis")) as r:
        yield Sessions(JobStore.connect(r.url).r, [TOKEN], 3600)


@pytest.fixture
def bare(sessions: Sessions) -> TestClient:
    app = FastAPI()
    dashboard.install(app, sessions)
    return TestClient(app, base_url="http://dash.test", follow_redirects=False)


def _sign_in(client: TestClient) -> None:
    r = client.post("/login", data={"token": TOKEN})
    assert r.status_code == 303, r.text


def test_pages_need_the_cookie(bare: TestClient) -> None:
    for path in ("/", "/jobs/new", "/jobs/abc", "/workers", "/schedules"):
        r = bare.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    assert bare.get("/").headers["location"] == "/login"
    assert bare.get("/jobs/abc?x=1").headers["location"] == "/login?next=%2Fjobs%2Fabc%3Fx%3D1"
    bare.cookies.set(COOKIE, "wrong")
    assert bare.get("/").status_code == 303
    page = bare.get("/login")
    assert page.status_code == 200 and 'name="token"' in page.text
    assert bare.get("/static/common.js").status_code == 200  # assets need no session


def test_login_sets_a_strict_http_only_session_cookie(bare: TestClient, sessions: Sessions) -> None:
    bad = bare.post("/login", data={"token": "nope"})
    assert bad.status_code == 401 and "not valid" in bad.text and COOKIE not in bad.cookies
    r = bare.post("/login", data={"token": TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    session_id = r.cookies[COOKIE]
    assert TOKEN not in cookie and len(session_id) >= 43  # an opaque id, never the token
    assert all(a in cookie.lower() for a in ("httponly", "samesite=strict", "path=/", "max-age=3600")), cookie
    assert "secure" not in cookie.lower()  # plain http here; https sets Secure
    assert sessions.check(session_id)
    page = bare.get("/")
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    out = bare.post("/logout")
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert f'{COOKIE}=""' in out.headers["set-cookie"] and "max-age=0" in out.headers["set-cookie"].lower()
    # Signing out ends the session on the server: the old cookie, kept or copied, opens nothing.
    assert not sessions.check(session_id)
    bare.cookies.set(COOKIE, session_id)
    assert bare.get("/").status_code == 303
    bare.cookies.set(COOKIE, TOKEN)  # nor does the token itself in the cookie
    assert bare.get("/").status_code == 303


def test_login_returns_only_to_local_pages(bare: TestClient) -> None:
    for nxt, want in [("/jobs/abc", "/jobs/abc"), ("//evil.example/x", "/"), ("https://evil.example", "/"),
                      ("/\\evil.example", "/"), ("", "/")]:  # fmt: skip
        r = bare.post("/login", data={"token": TOKEN, "next": nxt})
        assert r.headers["location"] == want, nxt
    for header, value in [("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site"),
                          ("Sec-Fetch-Site", "same-site"), ("Origin", "null")]:  # fmt: skip
        cross = bare.post("/login", data={"token": TOKEN}, headers={header: value})
        assert cross.status_code == 403 and "set-cookie" not in cross.headers, (header, value)
    same = bare.post("/login", data={"token": TOKEN}, headers={"Origin": "http://dash.test"})
    assert same.status_code == 303


def test_what_the_server_writes_is_escaped(bare: TestClient) -> None:
    _sign_in(bare)
    evil = '"><script>alert(1)</script>'
    page = bare.get("/", params={"label": evil})
    assert evil not in page.text and "&quot;&gt;&lt;script&gt;" in page.text
    assert bare.get("/jobs/<b>x").status_code == 404
    login = bare.get("/login", params={"next": '/"><i>x'})
    assert "<i>x" not in login.text
    assert bare.post("/login", data={"token": "<b>t</b>"}).text.count("<b>t</b>") == 0


# ---------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One worker whose source reads are paced to 150 kB/s, so a job runs for several seconds."""
    env = {"RECAST_FILE_ROOTS": str(tmp_path_factory.getbasetemp()), "RECAST_READ_LIMIT_MB_S": "0.15"}
    svc = Service(tmp_path_factory.mktemp("dashboard-svc"), env)
    try:
        yield svc.start(workers=1)
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[Page]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(
        base_url=service.url, viewport={"width": 1360, "height": 900}, timezone_id=BROWSER_ZONE
    )
    context.set_default_timeout(20_000)
    expect.set_options(timeout=20_000)  # expect() keeps its own 5 s default; a loaded CI host needs more
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"JavaScript errors: {errors}"


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def expect_cut_path(node, full: str) -> None:
    """A location shown on one line, cut with an ellipsis, the whole of it on hover."""
    expect(node).to_have_attribute("title", full)
    cut = node.evaluate(
        "n => getComputedStyle(n).textOverflow === 'ellipsis' && getComputedStyle(n).whiteSpace === 'nowrap'"
        " && n.scrollWidth > n.clientWidth"
    )
    assert cut, f"{full} is not cut with an ellipsis"


def sign_in(page: Page) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/$"))


@needs_browser
def test_sign_in_and_page_guard(page: Page, service: Service) -> None:
    r = httpx.get(service.url + "/jobs/new", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    bad = httpx.post(service.url + "/login", data={"token": "nope"}, follow_redirects=False)
    assert bad.status_code == 401 and "not valid" in bad.text

    page.goto("/schedules")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#token", "wrong-token")
    page.click("#login-form button[type=submit]")
    expect(page.locator(".alert.error")).to_contain_text("not valid")
    shot(page, "login-error")
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/schedules$"))  # back where the guard sent us from
    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert cookie["value"] != TOKEN  # a session, not the token
    hours_left = (cookie["expires"] - datetime.now(UTC).timestamp()) / 3600
    assert 11.9 < hours_left <= 12, hours_left
    session = {COOKIE: cookie["value"]}
    assert httpx.get(service.url + "/v1/jobs", cookies=session).status_code == 200

    page.click("header .logout button")
    expect(page).to_have_url(re.compile(r"/login$"))
    assert not [c for c in page.context.cookies() if c["name"] == COOKIE]
    assert httpx.get(service.url + "/v1/jobs", cookies=session).status_code == 401  # ended on the server
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login$"))


@needs_browser
def test_submit_follow_report_and_cancel(page: Page, service: Service, checkpoint, tmp_path: Path) -> None:
    src = checkpoint("mistral4")
    sign_in(page)
    page.click("header nav >> text=New job")
    expect(page).to_have_url(re.compile(r"/jobs/new$"))

    # A bad source: the API's problem detail is shown as text, markup in it stays inert.
    page.fill("#source", "file:///nowhere/<b>bold</b>")
    page.click("#preview-button")
    expect(page.locator("#preview-error")).to_contain_text("<b>bold</b>")
    assert page.locator("#preview-error b").count() == 0

    # The preflight preview: adapter, quantization, size and what the output will be.
    target = f"file://{tmp_path}/{'a-rather-long-directory-name-' * 6}/native"
    page.fill("#source", f"file://{src}")
    page.fill("#target", target)
    page.fill("#labels", "team=dashboard, run=1")
    page.click("#preview-button")
    expect(page.locator("#preview-adapter")).to_have_text("mistral4")
    expect(page.locator("#preview-quantization")).to_contain_text("per-tensor")
    expect(page.locator("#preview-size")).to_contain_text("3 shards")
    expect(page.locator("#preview-outcome")).to_contain_text("hf → native")
    expect(page.locator("#to")).to_have_value("native")
    shot(page, "new-job-preview")

    page.click("#submit-button")
    expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#state")).to_have_text(re.compile("running|verifying|uploading"), timeout=30_000)
    expect(page.locator("#live")).to_have_text("live")
    shot(page, "job-running")
    expect(page.locator("#state")).to_have_text("succeeded", timeout=60_000)
    # Driven by the event stream: many events arrived and the page never reloaded.
    assert int(page.evaluate("document.body.dataset.events")) > 4
    expect(page.locator("#shards tbody tr")).to_have_count(3)
    expect(page.locator("#shards tbody tr[data-status=converted]")).to_have_count(3)
    assert page.locator("#shards tbody tr[data-shard^='model-0000']").count() == 3
    for state in ("queued", "running", "verifying", "uploading", "succeeded"):
        expect(page.locator(f"#timeline li[data-state={state}]")).to_have_count(1)
    expect(page.locator("#target-location")).to_have_text(target)
    expect_cut_path(page.locator("#target-location"), target)
    expect(page.locator("#cancel")).to_be_hidden()  # a finished job has no Cancel button
    expect(page.locator("#error-panel")).to_be_hidden()
    for when in page.locator("#facts time").all() + page.locator("#timeline time").all():
        expect(when).to_have_text(LOCAL_TIME)

    # The verification report.
    expect(page.locator("#report-verdict")).to_have_text("passed")
    rows = page.locator("#report-table tbody tr")
    expect(rows.first).to_be_visible()
    assert rows.count() > 10
    expect(page.locator("#report-accounting details[data-category=unaccounted] summary")).to_have_text(
        "unaccounted: 0"
    )
    page.fill("#tensor-filter", "zzz-no-such-tensor")
    expect(rows).to_have_count(0)
    page.fill("#tensor-filter", "")
    shot(page, "job-succeeded-report")

    # The list, with its filters.
    page.click("header nav >> text=Jobs")
    row = page.locator(f"#jobs tbody tr[data-job='{job_id}']")
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text("mistral4")
    expect(row.locator("time")).to_have_text(LOCAL_TIME)
    expect_cut_path(row.locator(".locations .path").nth(1), target)
    shot(page, "jobs")
    page.goto("/?label=team%3Ddashboard")
    expect(page.locator(f"#jobs tbody tr[data-job='{job_id}']")).to_be_visible()
    page.goto("/?state=failed")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator(f"#jobs tbody tr[data-job='{job_id}']")).to_have_count(0)

    # A slow job, cancelled from its page while a shard is under way.
    with service.client() as c:
        slow = submit(
            c, {"source": f"file://{src}", "target": f"file://{tmp_path}/cancelled", "to": "native"}
        )
    page.goto(f"/jobs/{slow['id']}")
    expect(page.locator("#shards tbody tr[data-status=converting]").first).to_be_visible(timeout=30_000)
    # Shards not started yet are counted as pending, never given made-up names.
    pending = page.locator("#shards tbody tr[data-status=pending]")
    expect(pending).to_have_count(1)
    expect(pending).to_contain_text(re.compile(r"\d shards? not started\s*pending"))
    assert all(n.startswith("model-") for n in page.locator("#shards tbody tr[data-shard]").evaluate_all(
        "rows => rows.map(r => r.dataset.shard)"))  # fmt: skip
    shot(page, "job-pending-shards")
    cancel = page.locator("#cancel")
    expect(cancel).to_be_enabled()
    cancel.click()
    expect(cancel).to_have_text("Really cancel?")
    cancel.click()
    expect(page.locator("#state")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("#timeline li[data-state=cancelling]")).to_have_count(1)
    expect(cancel).to_be_hidden()
    shot(page, "job-cancelled")
    assert not (tmp_path / "cancelled").exists()


@needs_browser
def test_workers_page_and_a_running_jobs_throughput(
    page: Page, service: Service, checkpoint, tmp_path
) -> None:
    """The fleet as the workers report it: the one worker alive, on the CPU, converting a shard of a
    running job at a rate; that job's page shows its throughput, time left and the chart over time; the
    jobs list shows the queue's depth (two jobs of three shards each, one worker: work waits)."""
    # 2.3 MB of shards at 150 kB/s: each job runs well past the checks below, so both are still running
    # when they are cancelled (a 1 MB Mistral 4 finished before its page showed a rate on a loaded machine,
    # and a 0.9 MB DeepSeek-V3 once before the cancel, in the full suite on a 2-core machine)
    src = checkpoint("gemma4", scheme="block")
    with service.client() as c:
        ids = [
            submit(c, {"source": f"file://{src}", "target": f"file://{tmp_path}/out-{i}", "to": "native"})[
                "id"
            ]
            for i in range(2)
        ]
    either = re.compile(f"^({'|'.join(ids)})$")
    sign_in(page)
    expect(page.locator("#queue-units")).to_have_text(re.compile(r"^[1-9]\d* work units waiting$"))
    expect(page.locator("#queue-jobs")).to_have_text(re.compile(r"^\d+ jobs queued$"))
    expect(page.locator(f"#jobs tbody tr[data-job='{ids[0]}'] .rate")).to_have_text(
        re.compile(r"^\d[\d.]* (B|kB|MB)/s · .+ left$")
    )
    expect(page.locator("#queue-workers")).to_have_text("1 worker alive, 1 converting")
    shot(page, "jobs-queue")

    page.goto(f"/jobs/{ids[0]}")
    expect(page.locator("#throughput")).to_have_text(re.compile(r"^\d[\d.]* (B|kB|MB)/s$"), timeout=30_000)
    expect(page.locator("#time-left")).to_have_text(re.compile(r"^\d+(\.\d)? s$|min"))
    chart = page.locator("#throughput-chart")
    expect(chart).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"), timeout=30_000)
    expect(chart.locator("polyline.line")).to_be_visible()
    expect(page.locator("#throughput-caption")).to_contain_text("latest")
    shot(page, "job-throughput")

    page.click("header nav >> text=Workers")
    row = page.locator("#workers tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_have_attribute("data-alive", "true")
    expect(row.locator(".device")).to_have_text("cpu")
    expect(row.locator(".job-link").first).to_have_text(either)
    expect(row.locator(".shard").first).to_have_text(re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$"))
    expect(row.locator(".slots")).to_have_text(re.compile(r"^[12] of 2 slots$"))
    expect(row.locator(".throughput")).to_have_text(re.compile(r"^\d[\d.]* (B|kB|MB)/s$"))
    expect(row.locator(".heartbeat")).to_have_text(re.compile(r" ago$"))
    expect(page.locator("#workers-alive")).to_have_text("1 of 1")
    shot(page, "workers")

    with service.client() as c:
        for job_id in ids:
            assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        for job_id in ids:
            assert wait(c, job_id)["state"] == "cancelled"
    expect(row).to_have_attribute("data-busy", "false")
    expect(row.locator(".current")).to_have_text("idle")


@needs_browser
def test_a_page_on_another_port_cannot_use_the_session(page: Page, service: Service, tmp_path: Path) -> None:
    """SameSite=Strict does not stop it: the same host on another port is the same site, so the browser
    sends the cookie along. The API refuses the request because the browser says it is not same-origin."""
    template = {"source": f"file://{tmp_path}", "source_pattern": "step-*",
                "target": f"file://{tmp_path}/out/{{name}}", "to": "native"}  # fmt: skip
    with service.client() as c:
        r = c.post(
            "/v1/schedules", json={"name": "csrf", "cron": "0 3 * * *", "template": template, "paused": True}
        )
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
    run = f"{service.url}/v1/schedules/{sid}/run"
    elsewhere = re.sub(r":\d+$", ":9", service.url) + "/elsewhere"  # nothing listens: the route answers
    page.route(elsewhere, lambda route: route.fulfill(content_type="text/html", body=(
        f'<form id="f" method="post" action="{run}"></form>'
        "<script>document.getElementById('f').submit()</script>")))  # fmt: skip
    sign_in(page)
    page.goto(elsewhere)
    expect(page.locator("body")).to_contain_text("cross_site_request")
    with service.client() as c:
        assert c.get(f"/v1/schedules/{sid}/firings").json()["firings"] == []
    # From the dashboard's own page the same request, with the same cookie, is accepted.
    page.goto("/schedules")
    assert page.evaluate(f"fetch('/v1/schedules/{sid}/run', {{method: 'POST'}}).then(r => r.status)") == 202
    with service.client() as c:
        assert len(c.get(f"/v1/schedules/{sid}/firings").json()["firings"]) == 1
        assert c.delete(f"/v1/schedules/{sid}").status_code == 204


def _next_3am_utc(now: datetime) -> datetime:
    today = now.replace(hour=3, minute=0, second=0, microsecond=0)
    return today if today > now else today + timedelta(days=1)


@needs_browser
def test_schedule_times_are_exact_and_in_utc(page: Page, service: Service, tmp_path: Path) -> None:
    template = {"source": f"file://{tmp_path}", "source_pattern": "step-*",
                "target": f"file://{tmp_path}/{'converted-checkpoints-' * 8}/{{name}}", "to": "native"}  # fmt: skip
    with service.client() as c:
        r = c.post("/v1/schedules", json={"name": "nightly", "cron": "0 3 * * *", "template": template})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        want = _next_3am_utc(datetime.now(UTC))
        assert datetime.fromisoformat(r.json()["next_run_at"]) == want  # exactly 03:00, not 02:59:59.99
    sign_in(page)
    page.goto("/schedules")
    row = page.locator(f"#schedules tbody tr[data-schedule='{sid}']")
    expect(row.locator(".next-run")).to_have_text(want.strftime("%Y-%m-%d 03:00:00 UTC"))
    expect_cut_path(row.locator(".locations .path").nth(1), template["target"])
    row.get_by_role("button", name="Run now").click()
    firing = page.locator(f"tr.firings[data-firings='{sid}'] tbody tr").first
    expect(firing.locator("time")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$"))
    expect(row.locator(".last-run")).to_have_text(re.compile(r" UTC$"))
    shot(page, "schedules")
    with service.client() as c:
        assert c.delete(f"/v1/schedules/{sid}").status_code == 204


@needs_browser
def test_api_docs_work_offline(page: Page, service: Service) -> None:
    """/docs loads Swagger UI from the service itself: every request off the service's host is refused."""
    here = urlsplit(service.url).netloc
    elsewhere: list[str] = []

    def only_here(route) -> None:
        if urlsplit(route.request.url).netloc == here:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Recast")
    expect(page.locator(".opblock-summary-path", has_text="/v1/jobs").first).to_be_visible()
    assert not elsewhere, f"/docs reached beyond the service: {elsewhere}"
    shot(page, "api-docs")
