"""Checkpoints before any job: what a source is (from its headers), and the model families known."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import SIGNED_IN, UNAUTHORIZED, ServicesDep
from service.problems import declared, recoded
from service.schemas import Adapter, CheckpointInfo, InspectRequest
from service.submission import check_adapter, check_credential, check_source, parse, pin_source
from worker.engine.adapters import ADAPTERS
from worker.engine.errors import RecastError
from worker.engine.inspect import inspect
from worker.stores import open_source

router = APIRouter(prefix="/v1", tags=["checkpoints"], dependencies=SIGNED_IN, responses=UNAUTHORIZED)

INSPECT_PROBLEMS = {
    422: ("invalid_request", "invalid_location", "credential_unknown", "credential_invalid", "adapter_unknown",
          "source_not_found", "source_inaccessible", "not_a_checkpoint", "bad_checkpoint", "unsupported_model",
          "adapter_mismatch"),
    503: ("storage_unavailable", "credentials_unavailable"),
}  # fmt: skip


@router.post("/inspect", responses=declared(INSPECT_PROBLEMS))
def inspect_checkpoint(body: InspectRequest, svc: ServicesDep) -> CheckpointInfo:
    """Preflight: what the checkpoint is and what converting it would need, from headers only."""
    settings = svc.settings
    loc = parse(body.source, "source", settings)
    check_credential(body.source_credential, "source_credential", loc, settings)
    check_adapter(body.adapter)
    loc = pin_source(loc, settings.stores, body.source_credential)
    check_source(loc, settings.stores, body.source_credential)
    with recoded({RecastError: "source_inaccessible"}, "source"):
        info = inspect(open_source(loc, settings.stores, body.source_credential), body.adapter, body.dtype)
    return CheckpointInfo.model_validate({**info, "source": loc.url})


@router.get("/adapters")
def list_adapters() -> list[Adapter]:
    """The model families, for ``adapter`` in a job or an inspection."""
    return [Adapter(**a.describe()) for a in ADAPTERS.values()]
