"""``recast jobs``: submit, list, read, follow, cancel and report jobs of a running service.

A thin shell over ``recast.client``: the service is ``--url`` (``RECAST_URL``), the token ``RECAST_TOKEN``
(an environment variable only, so it never shows in ``ps`` or a shell history). ``watch`` and
``submit --wait`` follow the job's event stream, with a progress bar at a terminal and one line per state
and finished shard otherwise, and exit with the job's outcome, so a CI step can gate on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from core.states import STATES
from recast.client import DEFAULT_URL, TERMINAL, ApiError, Client, Event, Job
from worker.cli_print import human, print_report

CREDENTIAL = "a credential's name configured on the service (default: the service's own access)"
# Exit codes: what a pipeline branches on.
SUCCEEDED, FAILED, REFUSED = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """The ``jobs`` command and its subcommands."""
    jobs = sub.add_parser(
        "jobs", formatter_class=formatter, help="submit and follow jobs on a running service (RECAST_URL)",
        description="Talk to a running Recast service. The token is read from RECAST_TOKEN "
        "(`recast token` prints the one `recast up` uses). Exit codes: 0 done (a job that succeeded), "
        "1 the job failed or was cancelled, 2 the service refused the request or could not be reached.",
    )  # fmt: skip
    jobs.add_argument("--url", default=os.environ.get("RECAST_URL") or DEFAULT_URL,
                      help="the service's base URL (RECAST_URL)")  # fmt: skip
    verbs = jobs.add_subparsers(dest="verb", required=True, metavar="{submit,list,get,watch,cancel,report}")

    s = verbs.add_parser("submit", formatter_class=formatter, help="queue a conversion of SRC into DST",
                         description="Queue a conversion. SRC and DST are locations on the service's side: "
                         "file:///abs/path, s3://bucket/prefix, hf://org/repo[@rev]; a plain path becomes a "
                         "file:// URL of its absolute path (for a service on this machine).")  # fmt: skip
    s.add_argument("src", metavar="SRC", help="the checkpoint to convert")
    s.add_argument("dst", metavar="DST", help="where the converted checkpoint goes (must be empty)")
    s.add_argument("--to", choices=("native", "hf"), required=True, help="the layout to convert to")
    s.add_argument("--adapter", help="model family (default: detected from the config)")
    s.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16",
                   help="dtype of dequantized weights")  # fmt: skip
    s.add_argument("--quantize", choices=("keep", "none", "per-tensor", "per-channel", "block"), default="keep",
                   help="how FP8 weights are written, converting to hf")  # fmt: skip
    s.add_argument("--format", choices=("fp8", "compressed-tensors"),
                   help="how quantized hf output is spelled (default: the source's)")  # fmt: skip
    s.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip verification (default: verify every tensor)",
    )
    s.add_argument("--overwrite", action="store_true",
                   help="replace what DST holds when the job publishes (default: refuse a DST that "
                   "holds files)")  # fmt: skip
    s.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE",
                   help="a label to find the job by; repeatable (default: none)")  # fmt: skip
    s.add_argument(
        "--commit-message",
        metavar="TEXT",
        help="the Hub commit's message, for an hf:// DST (default: names the direction and adapter)",
    )
    s.add_argument(
        "--create-pr",
        action="store_true",
        help="publish to an hf:// DST as a pull request (default: commit to the branch)",
    )
    s.add_argument("--source-credential", metavar="NAME", help=f"for SRC: {CREDENTIAL}")
    s.add_argument("--target-credential", metavar="NAME", help=f"for DST: {CREDENTIAL}")
    s.add_argument("--idempotency-key", metavar="KEY",
                   help="resubmitting with the same key returns the same job (default: none)")  # fmt: skip
    s.add_argument("--wait", action="store_true",
                   help="follow the job and exit with its outcome (0 succeeded, 1 otherwise)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="print the job as JSON")

    ls = verbs.add_parser("list", formatter_class=formatter, help="list jobs, newest first",
                          description="List jobs, newest first.")  # fmt: skip
    ls.add_argument("--state", choices=STATES, help="only jobs in this state (default: any)")
    ls.add_argument("--label", metavar="KEY=VALUE", help="only jobs with this label (default: any)")
    ls.add_argument("--limit", type=int, default=20, help="how many jobs (1-200)")
    ls.add_argument("--cursor", help="the next_cursor of the previous page (default: the first page)")
    ls.add_argument("--json", action="store_true", help="print the page as JSON (with next_cursor)")

    for verb, text in (
        ("get", "show a job: state, progress, timings, error or result"),
        ("watch", "follow a job until it ends; exit 0 if it succeeded, 1 otherwise"),
        ("cancel", "cancel a queued or running job"),
        ("report", "show a finished job's verification report"),
    ):
        v = verbs.add_parser(
            verb, formatter_class=formatter, help=text, description=text[0].upper() + text[1:] + "."
        )
        v.add_argument("job_id", metavar="JOB", help="the job's id")
        v.add_argument("--json", action="store_true", help="print the answer as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``recast jobs VERB``; a refusal prints one line naming its code and exits 2."""
    try:
        with Client(args.url) as client:
            return _VERBS[args.verb](client, args)
    except ApiError as exc:
        print(f"recast: {exc.detail} ({exc.code})", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt:
        print(
            "recast: stopped watching; the job goes on (`recast jobs cancel JOB` stops it)", file=sys.stderr
        )
        return 130


def _location(arg: str) -> str:
    return arg if "://" in arg else Path(arg).expanduser().absolute().as_uri()


def _label(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"use KEY=VALUE, not {pair!r}")
    return key, value


def _submit(client: Client, args: argparse.Namespace) -> int:
    job = client.submit(
        _location(args.src), _location(args.dst), args.to, idempotency_key=args.idempotency_key,
        adapter=args.adapter, dtype=args.dtype, quantize=args.quantize, format=args.format, verify=args.verify,
        overwrite=args.overwrite, labels=dict(args.label) or None, commit_message=args.commit_message,
        create_pr=args.create_pr or None, source_credential=args.source_credential,
        target_credential=args.target_credential,
    )  # fmt: skip
    if not args.wait:
        print(json.dumps(job, indent=2) if args.json else f"{job['id']} {job['state']}")
        return SUCCEEDED
    print(f"recast: job {job['id']} {job['state']}", file=sys.stderr)
    return _follow(client, job["id"], args.json)


def _list(client: Client, args: argparse.Namespace) -> int:
    page = client.list(args.state, args.label, args.limit, args.cursor)
    if args.json:
        print(json.dumps(page, indent=2))
        return SUCCEEDED
    print(f"{'ID':<34} {'STATE':<11} {'SHARDS':>7} {'UPDATED':<20} SOURCE -> TARGET")
    for job in page["jobs"]:
        p = job["progress"]
        print(f"{job['id']:<34} {job['state']:<11} {p['shards_done']:>3}/{p['shards_total']:<3} "
              f"{job['updated_at'][:19]:<20} {job['request']['source']} -> {job['request']['target']}")  # fmt: skip
    if page["next_cursor"]:
        print(f"more: --cursor {page['next_cursor']}")
    return SUCCEEDED


def _get(client: Client, args: argparse.Namespace) -> int:
    job = client.get(args.job_id)
    if args.json:
        print(json.dumps(job, indent=2))
        return SUCCEEDED
    req, p = job["request"], job["progress"]
    print(f"{job['id']}  {job['state']}" + (f"  ({p['step']})" if p["step"] else ""))
    print(f"  {req['source']} -> {req['target']}  to {req['to']}, adapter {job['adapter'] or '-'}")
    print(
        f"  {p['shards_done']}/{p['shards_total']} shards, {human(p['bytes_in'])} of {human(p['bytes_total'])}"
    )
    print(
        f"  created {job['created_at']}, started {job['started_at'] or '-'}, finished {job['finished_at'] or '-'}"
    )
    if job["labels"]:
        print("  labels " + ", ".join(f"{k}={v}" for k, v in job["labels"].items()))
    _print_outcome(job)
    return SUCCEEDED


def _watch(client: Client, args: argparse.Namespace) -> int:
    return _follow(client, args.job_id, args.json)


def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    print(json.dumps(job, indent=2) if args.json else f"{job['id']} {job['state']}")
    return SUCCEEDED


def _report(client: Client, args: argparse.Namespace) -> int:
    report = client.report(args.job_id)
    print(json.dumps(report, indent=2)) if args.json else print_report(report)
    return SUCCEEDED


def _follow(client: Client, job_id: str, as_json: bool) -> int:
    """Follow the job's events to its end: a bar at a terminal, lines otherwise; exit with its outcome."""
    watcher = _Bar(job_id) if not as_json and sys.stderr.isatty() and sys.stdout.isatty() else _Lines(job_id)
    with watcher:
        job = client.wait(job_id, watcher.update)
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        _print_outcome(job)
    return SUCCEEDED if job["state"] == "succeeded" else FAILED


def _print_outcome(job: Job) -> None:
    if job["error"]:
        print(f"{job['id']} {job['state']}: {job['error']['code']}: {job['error']['message']}")
    elif job["result"]:
        result = job["result"]
        print(f"{job['id']} {job['state']}: {result.get('pr_url') or result['url']}")
    elif job["state"] in TERMINAL:
        print(f"{job['id']} {job['state']}")


class _Lines:
    """One line per state change and per finished shard, on stderr: for logs and pipes."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.shards_done = 0

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, event: Event) -> None:
        job, p = event.job, event.job["progress"]
        if event.type == "state":
            print(f"recast: job {self.job_id} {job['state']}" + (f": {p['step']}" if p["step"] else ""),
                  file=sys.stderr)  # fmt: skip
        elif p["shards_done"] != self.shards_done:
            percent = 100 * min(p["bytes_in"] / p["bytes_total"], 1) if p["bytes_total"] else 0
            rate = p.get("throughput_bytes_s")
            speed = f", {rate / 1e6:.1f} MB/s" if rate else ""
            left = f", about {p['eta_s']:.0f} s left" if rate and p.get("eta_s") is not None else ""
            print(f"recast: job {self.job_id} {p['step']}: {p['shards_done']}/{p['shards_total']} shards, "
                  f"{human(p['bytes_in'])} of {human(p['bytes_total'])} ({percent:.0f}%){speed}{left}",
                  file=sys.stderr)  # fmt: skip
        self.shards_done = p["shards_done"]


class _Bar:
    """A rich progress bar over the job's source bytes, labelled with its state, step and shards."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
        )  # fmt: skip
        self.task = self.bars.add_task(f"job {job_id}", total=None)

    def __enter__(self) -> _Bar:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def update(self, event: Event) -> None:
        job, p = event.job, event.job["progress"]
        shards = f" {p['shards_done']}/{p['shards_total']} shards" if p["shards_total"] else ""
        self.bars.update(
            self.task, total=p["bytes_total"] or None, completed=p["bytes_in"],
            description=f"{job['state']}{shards}" + (f" ({p['step']})" if p["step"] else ""),
        )  # fmt: skip


_VERBS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": _submit,
    "list": _list,
    "get": _get,
    "watch": _watch,
    "cancel": _cancel,
    "report": _report,
}
