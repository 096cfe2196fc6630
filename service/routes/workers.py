"""The fleet: which workers are alive, where, converting what, and how much work waits for them."""

from __future__ import annotations

from fastapi import APIRouter

from core.fleet import Fleet
from core.settings import QUEUE
from core.states import ACTIVE
from service.deps import SIGNED_IN, UNAUTHORIZED, ServicesDep
from service.schemas import QueueDepth, Worker, WorkerList

router = APIRouter(prefix="/v1/workers", tags=["workers"], dependencies=SIGNED_IN, responses=UNAUTHORIZED)


@router.get("")
def list_workers(svc: ServicesDep) -> WorkerList:
    """Every worker heard from in the last 15 minutes (alive or not), by name, and the queue's depth."""
    counts = svc.store.counts()
    queue = QueueDepth(
        jobs_queued=counts["queued"],
        jobs_active=sum(counts[s] for s in ACTIVE),
        work_units_queued=int(svc.store.r.llen(QUEUE)),
    )
    return WorkerList(workers=[Worker.of(w) for w in Fleet(svc.store.r).workers()], queue=queue)
