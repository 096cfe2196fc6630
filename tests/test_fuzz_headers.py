"""Fuzzing what Recast reads first: shard headers, the index, config.json and recast.json.

Hypothesis mutates the JSON of a small valid block-FP8 checkpoint (one copy; each case's files are put
back afterwards) and converts it to native. Every case must end in a ``RecastError`` with a one-line
message, or in a finished conversion, within ``CASE_SECONDS``, and leave nothing at the destination
when it fails; any other exception, or a hang, fails the test. Most mutations are refused while
parsing (milliseconds each); the few that stay valid convert in full (about 0.1 s each). Cases are
derandomized (the same ones every run); ``RECAST_FUZZ_EXAMPLES`` sets how many in all (default 2000,
under a minute on 2 cores).

``test_refuses_what_safetensors_refuses`` holds Recast's header validation against the safetensors
library's on single mutated shards: whatever the library refuses, Recast refuses. Recast also refuses
some files the library accepts, deliberately; ``STRICTER`` lists them, and any other disagreement fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from worker.cli import main
from worker.engine import api
from worker.engine.checkpoint import INDEX, SIDECAR
from worker.engine.errors import CheckpointError, RecastError
from worker.engine.safetensors_io import DTYPES, parse_header
from worker.engine.storage import LocalSource

EXAMPLES = int(os.environ.get("RECAST_FUZZ_EXAMPLES", "2000"))
CASE_SECONDS = 30
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)

# Files the safetensors library accepts and Recast refuses, on purpose (message patterns):
STRICTER = {
    # Recast converts only the dtypes it knows (safetensors_io.DTYPES); the library knows more (U32, F4...).
    "unknown dtype": r"field 'dtype' must be one of",
    # An unknown field in a tensor entry means a format extension Recast cannot honour; serde ignores it.
    "unknown field": r"unknown field '",
    # serde keeps the last of two equal tensor names; two parsers could then disagree on the bytes.
    "duplicate key": r"duplicate key",
    # A dimension above 2**63-1 cannot become a torch tensor; serde allows up to 2**64-1 (with 0 elements).
    "dimension above int64": r"field 'shape' must be a list of integers from 0 to",
}


# ---------------------------------------------------------------------------------------- the copy


@dataclass(frozen=True)
class Mutation:
    """Files to overwrite (or create) in the source copy; ``what`` is what Hypothesis prints."""

    what: str
    files: dict[str, bytes]

    def __repr__(self) -> str:
        return self.what

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # how Hypothesis prints a falsifying example
        p.text(self.what)


@dataclass(repr=False)
class Work:
    """One copy of the checkpoint, its original bytes, and its shard headers parsed once."""

    src: Path
    dst: Path
    original: dict[str, bytes]
    shards: list[str]
    headers: dict[str, dict[str, Any]]
    data: dict[str, bytes]

    @classmethod
    def copy_of(cls, ckpt: Path, where: Path) -> Work:
        src = where / "src"
        shutil.copytree(ckpt, src)
        original = {p.name: p.read_bytes() for p in src.iterdir()}
        shards = sorted(n for n in original if n.endswith(".safetensors"))
        headers, data = {}, {}
        for name in shards:
            raw = original[name]
            n = int.from_bytes(raw[:8], "little")
            headers[name], data[name] = json.loads(raw[8 : 8 + n]), raw[8 + n :]
        return cls(src, where / "out" / "native", original, shards, headers, data)

    def __repr__(self) -> str:
        return f"Work({self.src})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def changes(self, m: Mutation) -> bool:
        """Whether ``m`` changes anything: Hypothesis's simplest draws are often no-ops."""
        return any(self.original.get(name) != content for name, content in m.files.items())

    def json(self, name: str) -> Any:
        return json.loads(self.original[name])

    @contextmanager
    def applied(self, m: Mutation) -> Iterator[None]:
        for name, content in m.files.items():
            (self.src / name).write_bytes(content)
        try:
            yield
        finally:
            for name in m.files:
                if name in self.original:
                    (self.src / name).write_bytes(self.original[name])
                else:
                    (self.src / name).unlink()


@pytest.fixture(scope="module", params=["mistral4", "deepseek-v3"])
def work(request, checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Work:
    return Work.copy_of(checkpoint(request.param, scheme="block"), tmp_path_factory.mktemp("fuzz"))


class CaseHung(Exception):
    """A case ran past CASE_SECONDS: a hang is a failure, not a RecastError."""


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise CaseHung after ``seconds``; pytest-timeout's own alarm, if armed, is re-armed after."""

    def expire(*_: object) -> None:
        raise CaseHung(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    outer, interval = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001), interval)


def convert_mutated(work: Work, m: Mutation) -> None:
    """Convert with ``m`` applied: a one-line RecastError and nothing at DST, or a finished conversion."""
    with work.applied(m), time_bound(CASE_SECONDS):
        try:
            api.convert(work.src, work.dst, api.Options(to="native"))
        except RecastError as exc:
            message = str(exc)
            assert message and "\n" not in message, f"{m}: message is not one line: {message!r}"
            assert not work.dst.exists() or not any(work.dst.iterdir()), f"{m}: left files at DST"
        else:
            shutil.rmtree(work.dst)
    out = work.dst.parent
    staged = (
        [p.name for p in out.iterdir() if p.name.startswith(f".{work.dst.name}.")] if out.exists() else []
    )
    assert not staged, f"{m}: left staging directories {staged}"


# ------------------------------------------------------------------------------------ value makers

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
odd_ints = st.sampled_from([-1, -(2**63), 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30])
deep = st.sampled_from([3, 63, 64, 65, 129, 1000, 50_000])
JSON_BYTES = list(b'{}[]",:-.0123456789eE \\ntfalsu')


def nested(n: int, closed: bool = True) -> str:
    return "[" * n + ("]" * n if closed else "")


def dumps(value: Any) -> bytes:
    """JSON as a careless writer would emit it: NaN and lone surrogates included."""
    return json.dumps(value).encode()


@st.composite
def byte_noise(draw: st.DrawFn, raw: bytes) -> tuple[bytes, str]:
    """Overwrite, insert or delete a few bytes, biased towards the characters JSON cares about."""
    data, done = bytearray(raw), []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        byte = draw(st.sampled_from(JSON_BYTES) | st.integers(0, 255))
        if op == "delete" and data:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "set" and data and data[at] != byte:
            data[at] = byte
        else:
            op = "insert"
            data.insert(at, byte)
        done.append(f"{op}@{at}:{byte}")
    return bytes(data), " ".join(done)


# --------------------------------------------------------------------------------- shard mutations


def shard_bytes(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


# Strategies are built once, at import: building them per case (with lambdas) costs more than the case.
dims = st.one_of(st.integers(-3, 300), st.booleans(), st.floats(), st.text(max_size=3), odd_ints)
odd_lengths = odd_ints.filter(lambda n: 0 <= n < 2**64) | st.integers(0, 2**64 - 1)
odd_pairs = st.lists(odd_ints, min_size=2, max_size=2)
dtype_names = st.sampled_from([*DTYPES, "f32", "U32", "F4", "", " BF16", "bf16"])


def pick(draw: st.DrawFn, options: list[Any]) -> Any:
    return options[draw(st.integers(0, len(options) - 1))]


@st.composite
def field_values(draw: st.DrawFn, field: str, entry: dict[str, Any]) -> Any:
    """Wrong values for one tensor field, next to a few right-looking ones."""
    lo, hi = entry["data_offsets"]
    shape = entry["shape"]
    if draw(st.integers(0, 3)) == 0:
        return draw(json_values)
    if field == "data_offsets":
        d = draw(st.integers(-64, 64))
        near = [[hi, lo], [lo + d, hi + d], [lo, hi + d], [str(lo), str(hi)], [lo], [lo, hi, hi]]
        return pick(draw, [*near, [float(lo), float(hi)], [lo == 0, hi], {"0": lo, "1": hi}, draw(odd_pairs)])
    if field == "shape":
        return pick(
            draw,
            [
                draw(st.lists(dims, max_size=4)),
                [*shape, 1],
                [0, *shape[1:]],
                [-d for d in shape],
                draw(same_numel(shape)),
            ],
        )
    return draw(dtype_names)


@st.composite
def same_numel(draw: st.DrawFn, shape: list[int]) -> list[int]:
    """Another shape with as many elements: the parser accepts it, so the engine has to cope."""
    n = math.prod(shape)
    divisors = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    d = pick(draw, divisors) if divisors else 1
    options = [draw(st.permutations(shape)), [n], [1, *shape], [*shape, 1], [d, n // d], [n // d, d]]
    return [int(x) for x in pick(draw, options)]


@st.composite
def shard_mutations(draw: st.DrawFn, work: Work) -> Mutation:
    """One mutated shard: header bytes, length field, a tensor's fields or keys, metadata, nesting."""
    name = draw(st.sampled_from(work.shards))
    header = json.loads(json.dumps(work.headers[name]))
    data = work.data[name]
    keys = [k for k in header if k != "__metadata__"]
    key = draw(st.sampled_from(keys))
    # The parser refuses the first kinds in milliseconds; "retype" and "reshape" stay valid and mostly
    # convert in full (about 0.1 s each), so they are drawn less often.
    fast = ["noise", "length", "field", "drop-field", "extra-field", "entry", "keys", "metadata", "nesting"]
    kind = draw(st.sampled_from([*fast, *fast, "retype", "reshape"]))
    if kind == "noise":
        raw, what = draw(byte_noise(dumps(header)))
        return Mutation(f"{name}: header bytes {what}", {name: shard_bytes(raw, data)})
    if kind == "length":
        raw = dumps(header)
        size = 8 + len(raw) + len(data)
        near = [0, 1, 7, len(raw) - 1, len(raw) + 1, size - 8, size - 7, 100_000_001]
        length = pick(draw, near) if draw(st.booleans()) else draw(odd_lengths)
        return Mutation(f"{name}: length field {length}", {name: shard_bytes(raw, data, length)})
    if kind == "field":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = value = draw(field_values(field, header[key]))
        what = f"{name}: tensor {key!r} field {field!r} = {value!r}"
    elif kind == "retype":  # valid for the parser: the same item size, so the engine sees it
        size = DTYPES[header[key]["dtype"]].itemsize
        header[key]["dtype"] = value = pick(draw, [d for d, t in DTYPES.items() if t.itemsize == size])
        what = f"{name}: tensor {key!r} dtype {value}"
    elif kind == "reshape":  # valid for the parser too: the same number of elements
        key = draw(st.sampled_from(keys))
        shape = header[key]["shape"]
        header[key]["shape"] = value = draw(same_numel(shape))
        what = f"{name}: tensor {key!r} shape {shape} -> {value}"
    elif kind == "drop-field":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        del header[key][field]
        what = f"{name}: tensor {key!r} without {field!r}"
    elif kind == "extra-field":
        header[key][draw(st.text(max_size=6))] = value = draw(json_values)
        what = f"{name}: tensor {key!r} extra field = {value!r}"
    elif kind == "entry":
        header[key] = value = draw(json_values)
        what = f"{name}: tensor {key!r} entry = {value!r}"
    elif kind == "keys":
        op = draw(st.sampled_from(["drop", "rename", "copy", "duplicate", "swap-offsets"]))
        other = draw(st.sampled_from(keys))
        if op == "drop":
            del header[key]
        elif op == "rename":
            header[key + draw(st.text(max_size=3))] = header.pop(key)
        elif op == "copy":
            header[draw(st.text(max_size=8))] = dict(header[key])
        elif op == "swap-offsets":
            a, b = header[key], header[other]
            a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
        if op == "duplicate":
            raw = dumps(header)
            raw = raw[:-1] + b", " + json.dumps(key).encode() + b": " + dumps(header[other]) + b"}"
            return Mutation(f"{name}: tensor {key!r} twice", {name: shard_bytes(raw, data)})
        what = f"{name}: {op} tensor {key!r} (other {other!r})"
    elif kind == "metadata":
        value = draw(json_values | st.dictionaries(st.text(max_size=4), json_scalars, min_size=1, max_size=3))
        header["__metadata__"] = value
        what = f"{name}: __metadata__ = {value!r}"
    else:
        n, closed = draw(deep), draw(st.booleans())
        place = draw(st.sampled_from(["__metadata__", "dtype", "shape", "deep"]))
        if place in ("dtype", "shape"):
            header[key][place] = "@@"
        else:
            header[place] = "@@"
        raw = dumps(header).replace(b'"@@"', nested(n, closed).encode())
        state = "closed" if closed else "open"
        return Mutation(f"{name}: {place} nested {n} deep ({state})", {name: shard_bytes(raw, data)})
    return Mutation(what, {name: shard_bytes(dumps(header), data)})


# ------------------------------------------------------------------------- index, config, sidecar

SHARD_NAMES = [
    "/etc/passwd",
    "../outside.safetensors",
    "..\\outside.safetensors",
    "a\\b.safetensors",
    "",
    ".",
    "missing.safetensors",
    "config.json",
    "tokenizer.json",
    INDEX,
    "x\x00y.safetensors",
    "x\ny.safetensors",
    "a" * 300,
    "d/" * 2100 + "x",
    "sub/model.safetensors",
]


@st.composite
def index_mutations(draw: st.DrawFn, work: Work) -> Mutation:
    index = work.json(INDEX)
    keys = list(index["weight_map"])
    key = draw(st.sampled_from(keys))
    kind = draw(st.sampled_from(["entry", "drop", "add", "weight_map", "total_size", "metadata", "whole"]))
    if kind == "entry":
        index["weight_map"][key] = value = draw(
            st.sampled_from(SHARD_NAMES + work.shards) | st.text(max_size=12) | json_values
        )
        what = f"index: weight_map[{key!r}] = {value!r}"
    elif kind == "drop":
        del index["weight_map"][key]
        what = f"index: weight_map without {key!r}"
    elif kind == "add":
        new = draw(st.text(max_size=10))
        index["weight_map"][new] = value = draw(st.sampled_from(work.shards + SHARD_NAMES))
        what = f"index: weight_map[{new!r}] = {value!r} added"
    elif kind == "weight_map":
        index["weight_map"] = value = draw(json_values)
        what = f"index: weight_map = {value!r}"
    elif kind == "total_size":
        index["metadata"]["total_size"] = value = draw(json_values | odd_ints)
        what = f"index: metadata.total_size = {value!r}"
    elif kind == "metadata":
        index["metadata"] = value = draw(json_values)
        what = f"index: metadata = {value!r}"
    else:
        index = draw(json_values)
        what = f"index = {index!r}"
    return Mutation(what, {INDEX: dumps(index)})


CONFIG_VALUES = {
    "architectures": st.sampled_from(
        [["LlamaForCausalLM"], [1], "Mistral4ForCausalLM", [None], [], ["DeepseekV3ForCausalLM"]]
    ),
    "model_type": st.sampled_from(["llama", 3, None, ["mistral4"], "deepseek_v3", "mistral4"]),
    "text_config": st.sampled_from([[], "x", 3, {"model_type": 3}, {"quantization_config": []}, {}]),
    "quantization_config": st.sampled_from([[], "fp8", 3, {"weight_block_size": "x"}, {}]),
}


@st.composite
def config_mutations(draw: st.DrawFn, work: Work) -> Mutation:
    """config.json fields of the wrong type, and recast.json beside an hf checkpoint."""
    config = work.json("config.json")
    # Most kinds fail fast; "other" and "drop" mostly convert (slowly), so they are drawn less often.
    kinds = ["field"] * 3 + ["whole", "noise", "nesting", "sidecar"] * 2 + ["drop", "other"]
    kind = draw(st.sampled_from(kinds))
    if kind == "field":
        field = draw(st.sampled_from(list(CONFIG_VALUES)))
        config[field] = value = draw(CONFIG_VALUES[field] | json_values)
        what = f"config: {field} = {value!r}"
    elif kind == "drop":
        field = draw(st.sampled_from(list(CONFIG_VALUES)))
        config.pop(field, None)
        what = f"config without {field}"
    elif kind == "other":
        field = draw(st.sampled_from(sorted(config)) | st.text(max_size=6))
        config[field] = value = draw(json_values)
        what = f"config: {field} = {value!r}"
    elif kind == "whole":
        config = draw(json_values)
        what = f"config = {config!r}"
    elif kind == "noise":
        raw, what = draw(byte_noise(work.original["config.json"]))
        return Mutation(f"config bytes {what}", {"config.json": raw})
    elif kind == "nesting":
        n, closed = draw(deep), draw(st.booleans())
        raw = dumps(config)[:-1] + f', "deep": {nested(n, closed)}}}'.encode()
        return Mutation(f"config: deep x{n} ({'closed' if closed else 'open'})", {"config.json": raw})
    else:
        sidecar = draw(
            json_values
            | st.fixed_dictionaries(
                {},
                optional={
                    "format": st.sampled_from(["hf", "native", 3, None]),
                    "adapter": st.sampled_from(["mistral4", "deepseek-v3", "nope", 3, ["x"], None]),
                    "options": json_values,
                    "plan": json_values,
                    "source": json_values,
                },
            )
        )
        return Mutation(f"recast.json = {sidecar!r}", {SIDECAR: dumps(sidecar)})
    return Mutation(what, {"config.json": dumps(config)})


# ------------------------------------------------------------------------------------------- tests


def share(fraction: float) -> int:
    """This test's part of EXAMPLES, split over the two checkpoint families."""
    return max(1, int(EXAMPLES * fraction / 2))


@settings(FUZZ, max_examples=share(0.6))
@given(data=st.data())
def test_mutated_shard_headers(work: Work, data: st.DataObject) -> None:
    m = data.draw(shard_mutations(work))
    assume(work.changes(m))
    convert_mutated(work, m)


@settings(FUZZ, max_examples=share(0.15))
@given(data=st.data())
def test_mutated_index(work: Work, data: st.DataObject) -> None:
    m = data.draw(index_mutations(work))
    assume(work.changes(m))
    convert_mutated(work, m)


@settings(FUZZ, max_examples=share(0.1))
@given(data=st.data())
def test_mutated_config_and_sidecar(work: Work, data: st.DataObject) -> None:
    m = data.draw(config_mutations(work))
    assume(work.changes(m))
    convert_mutated(work, m)


def _library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # SafetensorError, and whatever else the bindings raise for a bad file
        return False


@settings(FUZZ, max_examples=share(0.15))
@given(data=st.data())
def test_refuses_what_safetensors_refuses(work: Work, data: st.DataObject) -> None:
    m = data.draw(shard_mutations(work))
    assume(work.changes(m))
    ((name, content),) = m.files.items()
    single = work.dst.parent.parent / "single"
    single.mkdir(exist_ok=True)
    (single / name).write_bytes(content)
    try:
        parse_header(LocalSource(single), name)
        refused = ""
    except RecastError as exc:
        refused = str(exc)
    accepted = _library_accepts(single / name)
    (single / name).unlink()
    if not accepted:
        assert refused, f"{m}: the safetensors library refuses this shard but Recast accepts it"
    elif refused:
        assert any(re.search(p, refused) for p in STRICTER.values()), (
            f"{m}: Recast refuses a shard the library accepts, not for a listed reason: {refused}"
        )


def _offsets_as_strings(w: Work, name: str) -> bytes:
    header = json.loads(json.dumps(w.headers[name]))
    header[next(k for k in header if k != "__metadata__")]["data_offsets"] = ["a", 3]
    return shard_bytes(dumps(header), w.data[name])


# Each case's ``what`` is the word its one-line error must contain.
CLI_CASES: dict[str, Callable[[Work], Mutation]] = {
    "nested 50,000 deep": lambda w: Mutation(
        "nests 50001 levels",
        {w.shards[0]: shard_bytes(f'{{"__metadata__": {nested(50_000)}}}'.encode(), b"")},
    ),
    "offsets as strings": lambda w: Mutation(
        "field 'data_offsets' must be two non-negative integers, got ['a', 3]",
        {w.shards[1]: _offsets_as_strings(w, w.shards[1])},
    ),
    "index names an absent shard": lambda w: Mutation(
        "gone.safetensors",
        {INDEX: dumps({"weight_map": dict.fromkeys(w.json(INDEX)["weight_map"], "gone.safetensors")})},
    ),
    "architectures not a list": lambda w: Mutation(
        "field 'architectures' must be a list of strings, got 7",
        {"config.json": dumps(w.json("config.json") | {"architectures": 7})},
    ),
}


@pytest.mark.parametrize("case", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_reports_one_line(case: Callable[[Work], Mutation], work: Work, capsys) -> None:
    m = case(work)
    with work.applied(m):
        code = main(["convert", str(work.src), str(work.dst), "--to", "native"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert m.what in err, err
    assert not work.dst.exists()


def test_experts_of_unequal_shapes_are_refused_at_planning(checkpoint, tmp_path: Path) -> None:
    """An expert part reshaped to as many elements (its block scale still fits) once crashed torch.stack."""
    work = Work.copy_of(checkpoint("deepseek-v3", scheme="block"), tmp_path)
    key = "model.layers.1.mlp.experts.1.down_proj.weight"
    name = work.json(INDEX)["weight_map"][key]
    header = json.loads(json.dumps(work.headers[name]))
    assert header[key]["shape"] == [160, 96]
    header[key]["shape"] = [256, 60]  # same bytes, and its [2, 1] block scale still fits
    with (
        work.applied(Mutation("reshaped expert", {name: shard_bytes(dumps(header), work.data[name])})),
        pytest.raises(CheckpointError, match=re.escape("experts.1.down_proj.weight")),
    ):
        api.convert(work.src, work.dst, api.Options(to="native"))
    assert not work.dst.exists()
