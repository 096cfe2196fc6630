"""Celery tasks: thin wrappers over ``worker.jobs``. Arguments are job ids and shard names, never
locations' credentials; everything else is read from the job store."""

from __future__ import annotations

from functools import cache, partial

from core.jobstore import JobStore
from core.settings import Settings
from worker import jobs
from worker.celery_app import app

RETRY_BACKOFF_S = (5, 30, 120, 600)


@cache
def _ctx() -> jobs.Context:
    settings = Settings.from_env()
    store = JobStore.from_settings(settings)
    return jobs.Context(
        store,
        settings,
        enqueue_shard=lambda job_id, name: convert_shard.delay(job_id, name),
        enqueue_finalize=lambda job_id: finalize.apply_async((job_id,), task_id=f"{job_id}-finalize"),
        enqueue_metadata=lambda job_id: metadata.apply_async((job_id,), task_id=f"{job_id}-metadata"),
    )


def _retrying(task, fn, *args: str) -> None:
    try:
        fn(_ctx(), *args)
    except jobs.RetryLater as exc:
        if task.request.retries >= len(RETRY_BACKOFF_S):
            jobs.give_up(_ctx(), args[0], str(exc))
            return
        delay = RETRY_BACKOFF_S[min(task.request.retries, len(RETRY_BACKOFF_S) - 1)]
        raise task.retry(countdown=delay, max_retries=len(RETRY_BACKOFF_S), exc=exc) from exc


@app.task(bind=True, name="recast.plan")
def plan(self, job_id: str) -> None:
    _retrying(self, jobs.plan_job, job_id)


@app.task(bind=True, name="recast.convert_shard")
def convert_shard(self, job_id: str, name: str) -> None:
    _retrying(self, partial(jobs.run_shard, worker=self.request.hostname), job_id, name)


@app.task(bind=True, name="recast.metadata")
def metadata(self, job_id: str) -> None:
    _retrying(self, partial(jobs.write_metadata, worker=self.request.hostname), job_id)


@app.task(bind=True, name="recast.finalize")
def finalize(self, job_id: str) -> None:
    _retrying(self, jobs.finalize, job_id)


@app.task(name="recast.sweep")
def sweep() -> None:
    """Sent by the beat every minute: queue the jobs that were recorded but never queued."""
    jobs.sweep(_ctx(), lambda job_id: plan.delay(job_id))
