"""Schedules: a cron expression and a job template; each firing converts the newest checkpoint found."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import SIGNED_IN, UNAUTHORIZED, ScheduleRecord, ServicesDep
from service.problems import HTTPProblem, declared, recoded
from service.schemas import Firing, FiringList, Schedule, ScheduleList, SchedulePatch, ScheduleRequest
from service.submission import check_template
from worker.engine.errors import RecastError

router = APIRouter(prefix="/v1/schedules", tags=["schedules"], dependencies=SIGNED_IN, responses=UNAUTHORIZED)

NOT_FOUND = {404: ("schedule_not_found",), 422: ("invalid_request",)}
TEMPLATE_PROBLEMS = ("invalid_request", "invalid_cron", "invalid_location", "credential_unknown",
                     "credential_invalid", "adapter_unknown")  # fmt: skip
CHECK_PROBLEMS = {503: ("credentials_unavailable",)}


@router.post("", status_code=201, responses=declared({422: TEMPLATE_PROBLEMS, **CHECK_PROBLEMS}))
def create_schedule(body: ScheduleRequest, response: Response, svc: ServicesDep) -> Schedule:
    """Each firing converts the newest checkpoint the template's source finds, once per revision."""
    check_template(body.template, svc.settings)
    with recoded({RecastError: "invalid_cron"}):
        rec = svc.schedules.create(body.name, body.cron, body.template, body.paused)
    response.headers["Location"] = f"/v1/schedules/{rec['id']}"
    return Schedule.model_validate(rec)


@router.get("")
def list_schedules(svc: ServicesDep) -> ScheduleList:
    """Every schedule, newest first."""
    return ScheduleList.model_validate({"schedules": svc.schedules.list()})


@router.get("/{schedule_id}", responses=declared(NOT_FOUND))
def get_schedule(schedule: ScheduleRecord, svc: ServicesDep) -> Schedule:
    """The schedule, with its next and last firing times."""
    return Schedule.model_validate(svc.schedules.view(schedule))


@router.patch("/{schedule_id}",
              responses=declared({404: NOT_FOUND[404], 422: TEMPLATE_PROBLEMS, **CHECK_PROBLEMS}))  # fmt: skip
def update_schedule(schedule: ScheduleRecord, body: SchedulePatch, svc: ServicesDep) -> Schedule:
    """Pause or resume (``{"paused": true}``), or change the name, cron or template."""
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if body.template is not None:
        check_template(body.template, svc.settings)
        changes["template"] = body.template.model_dump()  # whole, defaults included, as create stores it
    with recoded({RecastError: "invalid_cron"}):
        updated = svc.schedules.update(schedule["id"], changes)
    if updated is None:
        raise HTTPProblem(404, "schedule_not_found", f"no schedule {schedule['id']!r}")
    return Schedule.model_validate(updated)


@router.delete("/{schedule_id}", status_code=204, responses=declared(NOT_FOUND))
def delete_schedule(schedule: ScheduleRecord, svc: ServicesDep) -> None:
    """Remove the schedule and its beat entry; the jobs it submitted stay."""
    svc.schedules.delete(schedule["id"])


@router.get("/{schedule_id}/firings", responses=declared(NOT_FOUND))
def list_schedule_firings(schedule: ScheduleRecord, svc: ServicesDep) -> FiringList:
    """Newest first: when, which source revision, the job it submitted or why it skipped or failed."""
    return FiringList.model_validate({"firings": svc.schedules.firings(schedule["id"])})


@router.post("/{schedule_id}/run", status_code=202, responses=declared(NOT_FOUND))
def run_schedule(schedule: ScheduleRecord, svc: ServicesDep) -> Firing:
    """Fire now, as the beat would (also when paused); a refusal is recorded in the firing."""
    firing = svc.schedules.fire(schedule["id"], svc.settings, svc.send_task, manual=True)
    if firing is None:
        raise HTTPProblem(404, "schedule_not_found", f"no schedule {schedule['id']!r}")
    return Firing.model_validate(firing)
