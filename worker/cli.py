"""``recast``: drives the engine from a shell. Bad input prints one clear line and exits non-zero."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from worker import cli_jobs
from worker.cli_print import human, print_adapters, print_inspect, print_report
from worker.engine.errors import RecastError, VerificationError
from worker.progress import Display, ReadCounter


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its description where it has one to show: argparse's own
    ArgumentDefaultsHelpFormatter also prints "(default: None)" and "(default: False)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or not action.option_strings
            or action.required
            or default is None
            or isinstance(default, bool)
            or default == []
            or default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


def _interactive(args: argparse.Namespace) -> bool:
    """Bars only for a person watching: not under --json, not into a pipe or a log file."""
    return not args.json and sys.stderr.isatty() and sys.stdout.isatty()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recast", description="Convert LLM checkpoints between hf FP8 and native."
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="describe a checkpoint and what converting it needs")
    i.add_argument("src", nargs="?")
    i.add_argument("--adapter")
    i.add_argument("--credential")
    i.add_argument("--adapters", action="store_true", help="list the model families and how each is detected")
    i.add_argument("--json", action="store_true")
    c = sub.add_parser("convert", help="convert SRC into a new checkpoint at DST, verified")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=("native", "hf"), required=True)
    c.add_argument("--adapter")
    c.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16")
    c.add_argument(
        "--quantize", choices=("keep", "none", "per-tensor", "per-channel", "block"), default="keep"
    )
    c.add_argument(
        "--format",
        choices=("fp8", "compressed-tensors"),
        help="how quantized hf output is spelled (default: the source's)",
    )
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    c.add_argument("--no-verify", dest="verify", action="store_false")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--commit-message")
    c.add_argument("--create-pr", action="store_true")
    c.add_argument("--source-credential")
    c.add_argument("--target-credential")
    c.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="re-check an existing conversion of SRC at DST")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    v.add_argument("--source-credential")
    v.add_argument("--target-credential")
    v.add_argument("--json", action="store_true")
    u = sub.add_parser("up", help="run the whole service on this machine: API, one worker, embedded Redis")
    u.add_argument("--port", type=int, default=8000)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--file-root", action="append", help="directory file:// jobs may use (default: here)")
    u.add_argument("--data-dir", type=Path, help="where the embedded Redis and the development token live "
                   "(default: one directory per project under ~/.local/share/recast/projects)")  # fmt: skip
    t = sub.add_parser("token", help="print the development token `recast up` uses in this directory")
    t.add_argument("--data-dir", type=Path, help="the data directory given to `recast up --data-dir`")
    s = sub.add_parser("sample", help="write a small FP8 checkpoint with random weights to try Recast on")
    s.add_argument("dst")
    s.add_argument("--family", default="deepseek-v3", help="deepseek-v3 (128x128 block scales, the default) "
                   "or mistral4 (per-tensor scales, static activation scales, 3-D experts)")  # fmt: skip
    s.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("api", help="run the HTTP API (RECAST_REDIS_URL and RECAST_API_TOKENS required)")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--host", default="127.0.0.1")
    w = sub.add_parser("worker", help="run a job worker: one process per visible GPU, or one on the CPU")
    w.add_argument("--gpu", type=int, help="serve only this GPU (the parent sets CUDA_VISIBLE_DEVICES)")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--quiet", action="store_true", help="no start-up banner")
    b = sub.add_parser("beat", help="run the scheduler (celery-redbeat; several may run, one fires)")
    b.add_argument("--loglevel", default="INFO")
    b.add_argument("--quiet", action="store_true", help="no start-up banner")
    cli_jobs.add_parser(sub, HelpFormatter)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress lines (worker.progress) go to stderr while this command runs, one per shard.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("recast: %(message)s"))
    progress_log = logging.getLogger("recast.progress")
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    try:
        return _run(args)
    except VerificationError as exc:
        if exc.report is not None:
            if args.json:
                print(json.dumps(exc.report.to_json(), indent=2))
            else:
                print_report(exc.report.to_json())
        print(f"recast: {exc}", file=sys.stderr)
        return 3
    except RecastError as exc:
        print(f"recast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recast: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        progress_log.removeHandler(handler)


def _run(args: argparse.Namespace) -> int:
    if args.command == "jobs":
        return cli_jobs.run(args)
    if args.command == "up":
        from service.up import up

        return up(args.port, args.host, args.file_root, args.data_dir)
    if args.command == "token":
        from service.up import dev_token, project_data_dir

        print(dev_token(args.data_dir or project_data_dir(Path.cwd())))
        return 0
    if args.command == "sample":
        from worker.sample import write_sample

        made = write_sample(Path(args.dst), args.family, args.seed)
        print(f"wrote a {made['family']} sample FP8 checkpoint ({made['tensors']} tensors, "
              f"{human(made['bytes'])}, random weights) to {made['path']}")  # fmt: skip
        return 0
    if args.command == "api":
        import uvicorn

        from service.app import SERVER_OPTIONS

        uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port, **SERVER_OPTIONS)
        return 0
    if args.command == "worker":
        from worker.run import run_worker

        return run_worker(args.gpu, args.loglevel, args.quiet)
    if args.command == "beat":
        from worker.celery_app import app

        app.start([*(["--quiet"] if args.quiet else []), "beat", "--loglevel", args.loglevel])
        return 0
    from worker.engine import api

    if args.command == "inspect" and (args.adapters or not args.src):
        if not args.adapters:
            raise RecastError("inspect needs a checkpoint SRC, or --adapters to list the model families")
        families = [a.describe() for a in api.ADAPTERS.values()]
        print(json.dumps(families, indent=2)) if args.json else print_adapters(families)
        return 0
    from worker import direct

    settings = direct.settings_from_env()
    if args.command == "inspect":
        source = direct.source_of(direct.parse_argument(args.src, "SRC", settings), settings, args.credential)
        info = api.inspect(source, adapter=args.adapter)
        print(json.dumps(info, indent=2)) if args.json else print_inspect(info)
        return 0
    src = direct.parse_argument(args.src, "SRC", settings)
    dst = direct.parse_argument(args.dst, "DST", settings)
    if args.command == "convert":
        display = Display(f"converting {_name(args.src)}", "converted", _interactive(args))
        opts = api.Options(
            to=args.to,
            adapter=args.adapter,
            dtype=args.dtype,
            quantize=args.quantize,
            format=args.format,
            device=args.device,
            verify=args.verify,
            overwrite=args.overwrite,
        )
        with display:
            done, url = direct.convert(
                src, dst, opts, settings, display, args.source_credential, args.target_credential,
                args.commit_message, args.create_pr,
            )  # fmt: skip
        report = done.to_json()
        if dst.scheme != "file" and not args.json:
            print_report(report)
            print(f"published {url}")
            return 0
    else:
        display = Display(f"verifying {_name(args.dst)}", "verified", _interactive(args))
        with display:
            report = direct.verify(
                src, dst, settings, args.device, lambda written: ReadCounter(written, display),
                args.source_credential, args.target_credential,
            ).to_json()  # fmt: skip
        display.finish_all()
    print(json.dumps(report, indent=2)) if args.json else print_report(report)
    return 0 if report["summary"]["passed"] or not report["summary"]["verified"] else 3


def _name(location: str) -> str:
    """The last part of a path or URL: what a progress bar is labelled with."""
    return location.rstrip("/").rsplit("/", 1)[-1] or location


if __name__ == "__main__":
    sys.exit(main())
