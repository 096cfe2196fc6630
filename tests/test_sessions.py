"""Dashboard sessions against the whole app (its own Redis, no workers): the cookie holds a session, not
the token; a request the cookie signs in may change something only from the dashboard's own origin; a
session ends at sign-out, when it expires, and when its token is taken out of ``RECAST_API_TOKENS``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.embedded import EmbeddedRedis
from core.jobstore import JobStore
from core.sessions import PREFIX
from core.settings import Settings
from service.app import create_app
from service.deps import SESSION_COOKIE
from worker.stores import StoreSettings

HOST = "recast.test"
TOKENS = ("token-a-0123456789", "token-b-0123456789")
SAME_ORIGIN = [{"Sec-Fetch-Site": "same-origin"}, {"Origin": f"http://{HOST}"}]
CROSS_SITE = [
    {},  # neither header: no current browser sends an unsafe request so
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # another port or subdomain: SameSite=Strict sends the cookie along
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "same-site", "Origin": f"http://{HOST}"},  # the browser's own verdict wins
]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedRedis(tmp_path_factory.mktemp("sessions-redis")) as r:
        yield r.url


@pytest.fixture
def app_with(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """``app_with(tokens=…, session_ttl_s=…)``: a client of a fresh app over the same Redis, so a
    restart with other settings can be played."""
    clients: list[TestClient] = []

    def make(tokens: tuple[str, ...] = TOKENS, session_ttl_s: int = 3600) -> TestClient:
        settings = Settings(redis_url=redis_url, api_tokens=tokens, session_ttl_s=session_ttl_s,
                            stores=StoreSettings(file_roots=(tmp_path,)))  # fmt: skip
        client = TestClient(create_app(settings), base_url=f"http://{HOST}", follow_redirects=False)
        clients.append(client.__enter__())
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def sign_in(client: TestClient, token: str = TOKENS[0]) -> str:
    r = client.post("/login", data={"token": token})
    assert r.status_code == 303, r.text
    return r.cookies[SESSION_COOKIE]


def schedule(tmp_path: Path) -> dict:
    template = {"source": f"file://{tmp_path}/models", "source_pattern": "step-*",
                "target": f"file://{tmp_path}/out/{{name}}", "to": "native"}  # fmt: skip
    return {"name": "nightly", "cron": "0 3 * * *", "template": template, "paused": True}


def test_unsafe_cookie_requests_must_come_from_the_dashboard(app_with, tmp_path: Path) -> None:
    client = app_with()
    sign_in(client)
    assert client.get("/v1/schedules").status_code == 200  # reading needs no origin
    for headers in CROSS_SITE:
        r = client.post("/v1/schedules", json=schedule(tmp_path), headers=headers)
        assert r.status_code == 403, (headers, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "cross_site_request"
    assert client.get("/v1/schedules").json()["schedules"] == []
    created = [client.post("/v1/schedules", json=schedule(tmp_path), headers=h) for h in SAME_ORIGIN]
    assert [r.status_code for r in created] == [201, 201]
    sid = created[0].json()["id"]
    for method, path in (("PATCH", f"/v1/schedules/{sid}"), ("DELETE", f"/v1/schedules/{sid}"),
                         ("POST", f"/v1/schedules/{sid}/run")):  # fmt: skip
        r = client.request(method, path, json={"paused": False}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403, (method, path)
    assert client.get(f"/v1/schedules/{sid}").json()["paused"] is True
    assert client.delete(f"/v1/schedules/{sid}", headers=SAME_ORIGIN[0]).status_code == 204

    # A bearer token is not a browser's ambient credential: no origin is asked of it.
    client.cookies.clear()
    bearer = {"Authorization": f"Bearer {TOKENS[1]}", "Origin": "http://evil.example"}
    r = client.post("/v1/schedules", json=schedule(tmp_path), headers=bearer)
    assert r.status_code == 201, r.text
    assert client.delete(f"/v1/schedules/{r.json()['id']}", headers=bearer).status_code == 204
    # The 403 is declared with the 401 on the API's routes.
    spec = client.get("/openapi.json").json()
    assert "cross_site_request" in spec["paths"]["/v1/jobs"]["post"]["responses"]["403"]["description"]


def test_the_event_stream_follows_a_job_with_the_session_cookie(app_with) -> None:
    client = app_with()
    store: JobStore = client.app.state.services.store
    job = store.create({"source": "file:///x", "target": "file:///y", "to": "native"}, {}, None)
    store.transition(job["id"], ("queued",), "cancelled")
    assert client.get(f"/v1/jobs/{job['id']}/events").status_code == 401
    sign_in(client)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kinds = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert kinds == ["event: state", "event: state"]  # queued, cancelled; then the stream ends


def test_redis_holds_neither_the_token_nor_the_session_id(app_with) -> None:
    client = app_with()
    session_id = sign_in(client)
    r = client.app.state.services.store.r
    keys = r.keys(PREFIX + "*")
    assert keys and all(session_id not in k for k in keys)
    assert all(TOKENS[0] not in r.get(k) and session_id not in r.get(k) for k in keys)
    assert 3500 < r.ttl(keys[0]) <= 3600


def test_sessions_end_at_sign_out_on_expiry_and_with_their_token(app_with) -> None:
    client, other_browser = app_with(), app_with()
    a, b = sign_in(client, TOKENS[0]), sign_in(other_browser, TOKENS[1])
    assert a != b and TOKENS[0] not in a

    def works(app: TestClient, session_id: str) -> bool:
        app.cookies.clear()
        app.cookies.set(SESSION_COOKIE, session_id)
        return app.get("/v1/jobs").status_code == 200

    assert works(client, a) and works(client, b)
    # Token A is revoked: the API restarts without it. Its sessions end; B's go on.
    restarted = app_with(tokens=(TOKENS[1],))
    assert not works(restarted, a) and works(restarted, b)
    assert not works(client, a)  # deleted on sight: gone for every API process, even the old one
    # Signing out ends the session on the server, not only in this browser.
    restarted.cookies.set(SESSION_COOKIE, b)
    assert restarted.post("/logout", headers=SAME_ORIGIN[0]).status_code == 303
    assert not works(restarted, b)
    # Sessions expire (RECAST_SESSION_TTL_S), and the cookie says so too.
    short = app_with(session_ttl_s=1)
    r = short.post("/login", data={"token": TOKENS[0]})
    assert "max-age=1" in r.headers["set-cookie"].lower()
    c = r.cookies[SESSION_COOKIE]
    assert works(short, c)
    time.sleep(1.2)
    assert not works(short, c)


def test_session_ttl_is_configured() -> None:
    assert Settings.from_env({}).session_ttl_s == 12 * 3600
    assert Settings.from_env({"RECAST_SESSION_TTL_S": "900"}).session_ttl_s == 900
