"""Declared schemas for the JSON Recast reads before any tensor byte: shard headers, the index,
``config.json`` and ``recast.json``.

These files come from wherever a job points (the Hub, a bucket, a stranger's upload), so every field
the engine uses is checked here, once, for type and range before use. A damaged or hostile file then
ends in one ``CheckpointError`` naming the file, the key and the field, never in a KeyError, TypeError
or RecursionError deep inside a conversion. Pydantic's strict mode does the type work (no ``true`` for
an int, no ``"3"`` for 3); what a schema cannot say is checked beside it: nesting depth before parsing,
duplicate keys, and shard offsets tiling the data area exactly.

The JSON is parsed as strictly as the ``safetensors`` library's parser (serde_json) parses it, so a
file that library refuses is refused here too: no NaN/Infinity, no lone surrogate escapes, ``-0`` is
not an integer, nesting is bounded.
"""

from __future__ import annotations

import functools
import json
import math
import re
import reprlib
from collections import Counter
from collections.abc import Collection
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.fields import FieldInfo

from .errors import CheckpointError
from .fp8 import ScaleKind

# Shard headers nest 3 deep and configs rarely 6; serde_json stops at 128. json.loads recurses per level
# and would raise RecursionError near 1000, so depth is measured before parsing.
MAX_JSON_DEPTH = 64
# torch addresses elements with int64; a larger dimension cannot become a tensor.
INT64_MAX = 2**63 - 1

Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
FileName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="a file name of at most 4096 characters, none of them control characters",
    ),
]


class _Closed(BaseModel):
    """Structures Recast defines itself: an unknown field means a format this code does not know."""

    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    """Structures others extend (configs, indexes): unknown fields are kept, known ones are checked."""

    model_config = ConfigDict(strict=True, extra="allow")


# ------------------------------------------------------------------------------------ shard headers


def _known_dtype(value: str, info: ValidationInfo) -> str:
    """Dtype names are the engine's table (``safetensors_io.DTYPES``), passed in as validation context."""
    names = info.context["dtypes"]
    if value not in names:
        raise ValueError(f"one of {', '.join(names)}")
    return value


DtypeName = Annotated[str, AfterValidator(_known_dtype), Field(description="a dtype name")]


class TensorEntry(_Closed):
    """One tensor of a safetensors header."""

    dtype: DtypeName = Field(description="a dtype name")
    shape: list[Count] = Field(description=f"a list of integers from 0 to {INT64_MAX}")
    data_offsets: Annotated[list[Count], Field(min_length=2, max_length=2)] = Field(
        description="two non-negative integers"
    )


TensorTable = Annotated[
    dict[str, Annotated[TensorEntry, Field(description="an object with dtype, shape and data_offsets")]],
    Field(description="a JSON object"),
]


class HeaderMetadata(_Open):
    """The ``__metadata__`` entry, validated apart from the tensors it sits among."""

    metadata: dict[str, str] | None = Field(
        None, alias="__metadata__", description="a map of strings to strings"
    )


def check_layout(
    where: str, entries: dict[str, TensorEntry], itemsizes: dict[str, int], data_bytes: int | None
) -> None:
    """Each tensor spans exactly its bytes and, sorted by offset, the tensors tile the data area.

    ``data_bytes`` None (a recorded header with no file behind it) only asks for tiling from 0.
    """
    for key, e in entries.items():
        lo, hi = e.data_offsets
        need = itemsizes[e.dtype] * math.prod(e.shape)
        if hi < lo:
            raise CheckpointError(
                f"{where}: tensor {_short(key)}: field 'data_offsets' {[lo, hi]} ends before it starts"
            )
        if hi - lo != need:
            raise CheckpointError(
                f"{where}: tensor {_short(key)}: field 'data_offsets' {[lo, hi]} spans {hi - lo} bytes but "
                f"dtype {e.dtype} shape {e.shape} needs {need}"
            )
    at = 0
    for key, e in sorted(entries.items(), key=lambda kv: kv[1].data_offsets):
        lo, hi = e.data_offsets
        if lo != at:
            how = "overlaps the tensor before it" if lo < at else "leaves a gap after the tensor before it"
            raise CheckpointError(
                f"{where}: tensor {_short(key)}: field 'data_offsets' {[lo, hi]} {how}, which ends at {at}"
            )
        at = hi
    if data_bytes is not None and at > data_bytes:
        raise CheckpointError(
            f"{where}: tensors need {at} bytes of data but the file holds {data_bytes} after its header; "
            "the shard is truncated"
        )
    if data_bytes is not None and at < data_bytes:
        raise CheckpointError(
            f"{where}: {data_bytes - at} bytes after the last tensor belong to none; the shard is damaged"
        )


# ------------------------------------------------------------------------------- index and config


class IndexMetadata(_Open):
    total_size: Count = Field(0, description="a non-negative integer")


class Index(_Open):
    """``model.safetensors.index.json``; shard names are also checked by ``storage.check_relative``."""

    weight_map: Annotated[dict[str, FileName], Field(min_length=1)] = Field(
        description="a non-empty map of tensor name to shard file name"
    )
    metadata: IndexMetadata = Field(IndexMetadata(), description="an object")


class TextConfig(_Open):
    model_type: str = Field("", description="a string")
    quantization_config: dict[str, Any] = Field({}, description="an object")


class ModelConfig(_Open):
    """The ``config.json`` fields the engine reads (``adapters.detect``, quantization handling)."""

    # transformers writes ``"architectures": null`` for configs made without a model class.
    architectures: list[str] | None = Field(None, description="a list of strings")
    model_type: str = Field("", description="a string")
    text_config: TextConfig = Field(TextConfig(), description="an object")
    quantization_config: dict[str, Any] = Field({}, description="an object")


# ------------------------------------------------------------------------------------- recast.json


class RecordedTensor(_Closed):
    """One entry of the recorded key plan (``keymap.NativeTensor``)."""

    key: str = Field(description="a string")
    kind: Literal[
        "copy", "transpose", "stack", "zeros", "concat", "fp32", "split", "transpose2d", "squeeze", "unpad"
    ] = Field(
        description="one of copy, transpose, stack, zeros, concat, fp32, split, transpose2d, squeeze, unpad"
    )
    parts: list[str] = Field(description="a list of strings")
    experts: Count = Field(0, description="a non-negative integer")
    names: Annotated[int, Field(ge=1)] = Field(1, description="a positive integer")
    rows: Annotated[list[Count], Field(min_length=2)] | None = Field(
        None,
        description="split: [first row, end row, …], the row ranges of the one part, in order; unpad: "
        "[kept, stored], the entries of the one part's last dimension held and stored",
    )

    @model_validator(mode="after")
    def _split_rows(self) -> RecordedTensor:
        """A split piece names its row ranges of its one part, an unpadded tensor what it keeps of its one
        part; nothing else has rows."""
        if (self.kind in ("split", "unpad")) != (self.rows is not None):
            raise ValueError("rows are given for kinds split and unpad, and only for them")
        if self.kind == "unpad":
            if len(self.rows) != 2 or len(self.parts) != 1 or not 0 < self.rows[0] <= self.rows[1]:
                raise ValueError("an unpadded tensor is [kept, stored] of one part, 0 < kept <= stored")
        elif self.rows is not None and (
            len(self.rows) % 2
            or len(self.parts) != 1
            or any(a >= b for a, b in zip(self.rows[::2], self.rows[1::2], strict=True))
        ):
            raise ValueError("a split piece is row ranges [first, end) of one part, each first < end")
        return self


class RecordedQuant(_Closed):
    scale: str = Field(description="a string")
    # Lax for this one field only: a JSON string may name an enum member.
    kind: ScaleKind = Field(strict=False, description=f"one of {', '.join(ScaleKind)}")
    activation: str | None = Field(description="a string or null")
    zero_point: str | None = Field(None, description="a string or null")


class RecordedPlan(_Closed):
    tensors: list[RecordedTensor] = Field(description="a list of objects")
    quant: dict[str, RecordedQuant] = Field(description="a map of objects")


class RecordedSource(_Open):
    """What a conversion to native recorded about its source, to restore it byte for byte."""

    config: ModelConfig | None = Field(None, description="an object")
    dtypes: dict[str, DtypeName] = Field({}, description="a map of tensor name to dtype name")
    headers: dict[FileName, str] = Field({}, description="a map of shard file name to base64 text")
    index: str | None = Field(None, description="a string or null")
    config_raw: str = Field("", description="a string")


class RecordedOptions(_Open):
    # Values are checked by ``Options.validate`` when used; here only their type.
    dtype: str = Field("bf16", description="a string")
    quantize: str = Field("keep", description="a string")


class Sidecar(_Open):
    """``recast.json`` as the engine reads it back (``convert``, ``verify``, ``keymap``)."""

    format: Literal["native", "hf"] = Field("hf", description="native or hf")
    adapter: str | None = Field(None, description="a string")
    options: RecordedOptions = Field(RecordedOptions(), description="an object")
    plan: RecordedPlan | None = Field(None, description="an object")
    source: RecordedSource = Field(RecordedSource(), description="an object")


# ------------------------------------------------------------------------------------------ checking


@functools.cache
def _adapter(schema: Any) -> TypeAdapter[Any]:
    return TypeAdapter(schema)


def check(schema: Any, data: Any, where: str, dtypes: Collection[str], first: str = "") -> Any:
    """Validate ``data`` against the declared type ``schema`` and return the validated value; the first
    problem becomes one CheckpointError.

    ``first`` names what the outermost keys are ("tensor" for a header) when they are not fields.
    """
    try:
        return _adapter(schema).validate_python(data, context={"dtypes": tuple(dtypes)})
    except ValidationError as exc:
        raise CheckpointError(f"{where}: {_explain(schema, exc.errors()[0], data, first)}") from None


def _explain(schema: Any, error: Any, data: Any, first: str) -> str:
    """``field 'a.b' must be <its description>, got <value>``, for the deepest described field."""
    loc = tuple(error["loc"])
    skip = 1 if first and loc else 0
    parts, depth, described = _walk(schema, loc)
    prefix = f"{first} {_short(loc[0])}: " if skip else ""

    def field(n: int) -> str:
        path = "".join(parts[skip:n]).lstrip(".")
        return f"field {path!r} " if path else ""

    if error["type"] == "missing":
        return f"{prefix}{field(len(loc))}is missing"
    if error["type"] == "extra_forbidden":
        parent = "".join(parts[skip:-1]).lstrip(".")
        return f"{prefix}unknown field {_short(loc[-1])}" + (f" in {parent!r}" if parent else "")
    if error["type"] == "value_error":
        described = str(error["ctx"]["error"])
    elif not described:
        described = error["msg"].removeprefix("Input should be ")
    return f"{prefix}{field(depth)}must be {described}, got {_short(_at(data, loc[:depth]))}"


def _walk(schema: Any, loc: tuple[Any, ...]) -> tuple[list[str], int, str]:
    """Render each part of ``loc`` and find the deepest part whose declared type has a description."""
    t, desc = _unwrap(schema)
    if not desc and isinstance(t, type) and issubclass(t, BaseModel):
        desc = "a JSON object"
    best = (0, desc) if desc else (len(loc), "")
    parts = []
    for i, part in enumerate(loc):
        parts.append(f"[{part}]" if isinstance(part, int) else f"[{_short(part)}]")
        t, desc, name = _step(t, part)
        if name:
            parts[-1] = f".{name}"
        if desc:
            best = (i + 1, desc)
    return parts, *best


def _unwrap(t: Any) -> tuple[Any, str]:
    """Strip ``Annotated`` and ``| None``; keep the first description met."""
    desc = ""
    while True:
        origin = get_origin(t)
        if origin is Annotated:
            t, *meta = get_args(t)
            desc = desc or next(
                (m.description for m in meta if isinstance(m, FieldInfo) and m.description), ""
            )
        elif origin in (Union, UnionType):
            t = next(a for a in get_args(t) if a is not type(None))
        else:
            return t, desc


def _step(t: Any, part: Any) -> tuple[Any, str, str]:
    """The declared type one location part down, its description, and the field name if a field."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        for name, f in t.model_fields.items():
            if part in (name, f.alias):
                inner, desc = _unwrap(f.annotation)
                return inner, f.description or desc, str(part)
        return None, "", ""
    args = get_args(t)
    if get_origin(t) is dict and len(args) == 2:
        return *_unwrap(args[1]), ""
    if get_origin(t) is list and args:
        return *_unwrap(args[0]), ""
    return None, "", ""


def _at(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return data
    return data


_REPR = reprlib.Repr()
_REPR.maxstring = 200  # long enough for real tensor names
_REPR.maxother = _REPR.maxlong = 60
_REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 6, 4, 3


def _short(value: Any) -> str:
    """A one-line, bounded repr: values come from untrusted files and may be huge or hold newlines."""
    return _REPR.repr(value)


# -------------------------------------------------------------------------------------- JSON parsing

# A JSON string (closing quote optional, so an unterminated one ends the scan instead of backtracking).
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")


def json_depth(text: str) -> int:
    """Deepest bracket nesting outside strings, in linear time and without recursion."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode()
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def load_json(raw: bytes, where: str) -> Any:
    """Parse UTF-8 JSON the way serde_json would accept it; errors name ``where``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(
            f"{where}: JSON nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted"
        )
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_int=_int)
    except ValueError as exc:  # JSONDecodeError, the hooks below, integers longer than Python parses
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"duplicate key {_short(dup)}")
    for text in (s for pair in pairs for s in pair if isinstance(s, str) and not s.isascii()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{_short(text)} holds a lone surrogate escape") from None
    return out


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _int(text: str) -> int | float:
    # serde_json reads "-0" as a float; keep it one, so a strict integer field refuses it there and here.
    return -0.0 if text == "-0" else int(text)
