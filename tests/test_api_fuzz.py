"""The API against its own schema: Schemathesis generates requests from ``/openapi.json`` for every
operation, valid and invalid, and every answer must be no server error, a status the operation declares,
under the content type it declares, and in the declared schema; a 405 must name the methods the path
serves. It runs against the service under uvicorn with a real Redis but no workers, so accepted jobs stay
queued. Generated locations reach only what the test owns: ``file://`` under a temporary root that holds
a sample checkpoint, moto's S3 and the loopback Hub; some path ids and locations are drawn from a
dictionary of real ones (a cancelled job, a schedule, the sample), so the routes answer with something
besides 404 and 422. Derandomized and bounded (``RECAST_API_FUZZ_EXAMPLES`` per operation).

``test_every_v1_route_needs_a_token`` enumerates the routes from the app itself, so a new one cannot be
left out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.routing import iter_route_contexts
from harness import TOKEN, Service, submit
from servers import AWS_TEST_ENV, HubServer

from worker.sample import write_sample

EXAMPLES = int(os.environ.get("RECAST_API_FUZZ_EXAMPLES", "25"))
# Conformance of what the API answers, and that invalid input is refused with a 4xx; not
# positive_data_acceptance: a schema-valid request may still name a checkpoint that is not there (422).
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "negative_data_rejection",
          "ignored_auth", "unsupported_method", "allow_header_conformance")  # fmt: skip


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, s3_server: str, hub_server: HubServer) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("fuzz-files")
    env = {"RECAST_FILE_ROOTS": str(root), "RECAST_S3_ENDPOINT_URL": s3_server,
           "RECAST_HF_ENDPOINT": hub_server.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
           **AWS_TEST_ENV}  # fmt: skip
    write_sample(root / "ckpts" / "step-1")
    svc = Service(tmp_path_factory.mktemp("fuzz-svc"), env)
    try:
        yield svc.start(workers=0)
    finally:
        svc.stop()


def _real_things(api: Service) -> dict[str, Any]:
    """Dictionaries of ids and locations that exist, for the generator to draw from now and then."""
    root = Path(api.env["RECAST_FILE_ROOTS"])
    with api.client() as c:
        job = submit(
            c, {"source": f"file://{root}/ckpts/step-1", "target": f"file://{root}/out", "to": "native"}
        )
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"  # its events end
        template = {
            "source": f"file://{root}/ckpts",
            "target": f"file://{root}/sched/{{name}}",
            "to": "native",
        }
        schedules = []
        for name in ("kept", "deleted"):
            made = c.post("/v1/schedules", json={"name": name, "cron": "0 0 1 1 *", "template": template})
            assert made.status_code == 201, made.text
            schedules.append(made.json()["id"])
    return {
        "job": {"values": [job["id"]]},
        "schedule": {"values": [schedules[0]]},
        "deleted_schedule": {"values": [schedules[1]]},  # DELETE's own, so the other stays for the rest
        "cron": {"values": ["0 0 1 1 *", "*/5 * * * *"]},
        "source": {"values": [f"file://{root}/ckpts/step-1", f"file://{root}/ckpts", "s3://recast-fuzz/ckpt",
                              "hf://fuzz/ckpt"]},
        "target": {"values": [f"file://{root}/out", "s3://recast-fuzz/out", "hf://fuzz/out"]},
        "template_target": {"values": [f"file://{root}/sched/{{name}}"]},
    }  # fmt: skip


@pytest.fixture(scope="module")
def api_schema(api: Service) -> schemathesis.BaseSchema:
    drawn = {"path.job_id": "job", "path.schedule_id": "schedule", "body.source": "source",
             "body.target": "target", "body.template.source": "source",
             "body.template.target": "template_target", "body.cron": "cron"}  # fmt: skip
    drawn_by_delete = {"path.schedule_id": {"dictionary": "deleted_schedule", "probability": 0.3}}
    config = schemathesis.Config.from_dict({
        "seed": 13,
        "request-timeout": 30,
        "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
        "dictionaries": _real_things(api),
        "parameters": {key: {"dictionary": name, "probability": 0.3} for key, name in drawn.items()},
        # Not ready without workers is what /readyz is for: its 503 is the answer, not a failure.
        "operations": [
            {"include-path": "/readyz", "checks": {"not_a_server_error": {"expected-statuses": ["2XX", "4XX", 503]}}},
            {"include-method": "DELETE", "parameters": drawn_by_delete},
        ],
    })  # fmt: skip
    return schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_api_answers_as_its_schema_says(case: schemathesis.Case) -> None:
    case.call_and_validate()


def test_every_v1_route_needs_a_token(api: Service) -> None:
    assert api.app is not None
    routes = [(m, r.path) for r in iter_route_contexts(api.app.routes) if r.path and r.path.startswith("/v1/")
              for m in sorted(r.methods or ())]  # fmt: skip
    assert len(routes) >= 15, routes
    for method, path in routes:
        url = api.url + re.sub(r"\{[^}]+\}", "x", path)
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
            r = httpx.request(method, url, headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
