"""Reversible tensor operations as classes: each knows its forward, its inverse and its shapes.

One class per ``NativeTensor.kind``, and tensors.py (and to_native.py, for the dtype) dispatches to them
(the pattern transformers' ``conversion_mapping`` uses: ``Concatenate`` beside ``MergeModulelist``).
All work on native rows ``e0:e1`` along dim 0, the axis the pipeline streams by, so an operation never
needs a whole tensor in memory; the one exception says so (``whole``: a 2-D transpose, whose native rows
are hf columns), and the directions then give it the whole tensor as one unit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .errors import CheckpointError
from .keymap import NativeTensor
from .safetensors_io import TensorInfo

# get(key, r0, r1, transposed=False): rows r0:r1 of an hf tensor's value, last two dims swapped if asked.
Get = Callable[..., torch.Tensor]


class Operation(Protocol):
    """One native tensor from its hf parts, and back."""

    # Native rows are not hf rows: a unit takes the whole tensor (requests and views cover all of it).
    whole: bool

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        """The hf reads ``forward(t, e0, e1, …)`` makes: (key, first row, end row)."""

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        """Native rows ``e0:e1`` of ``t``."""

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        """The hf rows that native rows ``e0…`` hold, as views: (key, first row, end row, value)."""

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        """The native tensor's shape, from its parts' shapes."""

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Each hf part's shape, from the native tensor's."""

    def native_dtype(self) -> str | None:
        """The native tensor's safetensors dtype where the operation fixes it (None: its parts')."""


class Copy:
    """One hf tensor as one native tensor, same layout (a rename at most)."""

    whole = False

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        return [(t.parts[0], e0, e1)]

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        return get(t.parts[0], e0, e1)

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        return [(t.parts[0], e0, e0 + (native.shape[0] if native.dim() else 1), native)]

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        return infos[t.parts[0]].shape

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {t.parts[0]: shape}

    def native_dtype(self) -> str | None:
        return None


class Stack:
    """Per-expert 2-D parts as one ``[E, …]`` tensor whose slice ``e`` is ``cat(part.T for part in
    expert e's parts, -1)`` (DeepSeek-V3's ``gate_and_up_projs``): ``t.parts[e * t.names + j]`` is expert
    ``e``'s part ``j``, and a native row is one expert, all of its parts read whole."""

    whole = False

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        return [(p, None, None) for e in range(e0, e1) for p in t.part_of(e)]

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        return torch.stack(
            [torch.cat([get(p, None, None).T for p in t.part_of(e)], -1) for e in range(e0, e1)]
        )

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        out = []
        for i in range(native.shape[0]):
            cols = torch.chunk(native[i], t.names, dim=-1)
            out += [(key, None, None, piece.T) for key, piece in zip(t.part_of(e0 + i), cols, strict=True)]
        return out

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        first = infos[t.parts[0]].shape
        return (t.experts, first[1], sum(infos[p].shape[0] for p in t.part_of(0)))

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {p: (shape[2] // t.names, shape[1]) for p in t.parts}

    def native_dtype(self) -> str | None:
        return None


class Zeros:
    """A router bias NeMo's layout has and the source lacks, ``t.experts`` zeros in fp32, injected by
    to_native (no parts to read); the way back drops it."""

    whole = False

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        return []

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        return torch.zeros(e1 - e0, dtype=torch.float32)

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        return []

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        return (t.experts,)

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {}

    def native_dtype(self) -> str | None:
        return "F32"


class Concat:
    """Aggregated 3-D expert parts ``[E, O, I]``, each transposed, concatenated on the last dim:
    native ``[E, I, n·O]`` = ``cat(part.transpose(-1, -2) for part in parts, -1)``.

    Step-3.5 / 3.7 store ``moe.gate_proj`` and ``moe.up_proj`` as ``[E, inter, dim]``; NeMo's
    ``gate_and_up_projs`` is ``[E, dim, 2·inter]``. With one part it is the plain ``transpose`` of an
    aggregated expert tensor ``[E, A, B]`` ↔ ``[E, B, A]`` (Mistral 4's ``gate_up_proj``), which is this
    class too; rows are experts on both sides, so it streams by expert (a 2-D tensor is Transpose2d's).
    The parts must share their shape (the planner checks), so the inverse is an even split.
    """

    whole = False

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        return [(p, e0, e1) for p in t.parts]

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        parts = [get(p, e0, e1, transposed=True) for p in t.parts]
        # one part: no cat, whose copy would double the one contiguous() makes (none after a table decode)
        return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).contiguous()

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        e1 = e0 + native.shape[0]
        pieces = torch.chunk(native, len(t.parts), dim=-1)
        return [(p, e0, e1, x.transpose(-1, -2)) for p, x in zip(t.parts, pieces, strict=True)]

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        experts, rows, cols = infos[t.parts[0]].shape
        return (experts, cols, rows * len(t.parts))

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        experts, cols, width = shape
        return dict.fromkeys(t.parts, (experts, width // len(t.parts), cols))

    def native_dtype(self) -> str | None:
        return None


class Fp32(Copy):
    """One tensor held in fp32 natively, whatever its hf dtype: NeMo's ``_fp32_params`` holders
    (Qwen3.5's GatedDeltaNet ``A_log`` / ``dt_bias``), which its ``from_hf`` upcasts.

    Widening is exact, so the way back is a cast to the hf dtype (the source's, recorded in recast.json),
    which the round-trip checks prove lossless by comparing in fp32.
    """

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        return get(t.parts[0], e0, e1).float()

    def native_dtype(self) -> str | None:
        return "F32"


class Split:
    """Row ranges of one hf tensor as a native tensor of their own, in order: ``rows`` is ``[a0, b0, a1, b1,
    …]``. One range is one of the pieces a fused tensor splits into along dim 0 (Ling's
    ``query_key_value`` into ``q_proj`` / ``k_proj`` / ``v_proj``, by head counts from config.json); several
    gather a part from every tensor-parallel shard of a tensor saved shard by shard (MiMo-V2.5-Pro's
    ``[Q_0 | K_0 | V_0 | Q_1 | …]``), or all of them regrouped (its canonical ``[Q | K | V]``).

    Each piece is a ``NativeTensor`` with the source as its one part, so planning, streaming and checking
    stay per native tensor; the way back (to_hf) gathers the pieces of one hf tensor and lays their rows
    back where they came from. Block-FP8 sources split only on block boundaries (the planner refuses
    others), so each range starts on a scale row of the source; a sharded grid (``ScaleKind.SHARDED``)
    reads any row.
    """

    whole = False

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        return [(t.parts[0], a, b) for a, b, _ in spans(t.rows, e0, e1)]

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        got = [get(t.parts[0], a, b) for a, b, _ in spans(t.rows, e0, e1)]
        return got[0] if len(got) == 1 else torch.cat(got)

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        return [
            (t.parts[0], a, b, native[at - e0 : at - e0 + b - a])
            for a, b, at in spans(t.rows, e0, e0 + native.shape[0])
        ]

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        return (sum(b - a for a, b in ranges(t.rows)), *infos[t.parts[0]].shape[1:])

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The shape of the rows of the hf tensor this piece holds (to_hf joins the pieces)."""
        return {t.parts[0]: shape}

    def native_dtype(self) -> str | None:
        return None


def ranges(rows: list[int]) -> list[tuple[int, int]]:
    """A split piece's hf row ranges from its flat ``[a0, b0, a1, b1, …]``."""
    return list(zip(rows[::2], rows[1::2], strict=True))


def spans(rows: list[int], e0: int, e1: int) -> list[tuple[int, int, int]]:
    """The hf rows ``(a, b)`` that native rows ``e0:e1`` of a split piece are, each with the native row
    ``a`` lands on."""
    out, at = [], 0
    for a, b in ranges(rows):
        lo, hi = max(e0, at), min(e1, at + b - a)
        if lo < hi:
            out.append((a + lo - at, a + hi - at, lo))
        at += b - a
    return out


class Transpose2d:
    """A 2-D weight ``[O, I]`` held as its transpose ``[I, O]`` (Inkling's dense ``mlp.w13_dn`` /
    ``w2_md``), which the ``transpose`` rule gives a 2-D tensor (on 3-D experts it streams by expert).

    A native row is an hf column, so no row range of one is a row range of the other: a unit takes the
    whole tensor (``whole``), about as large as one dense projection of one layer.
    """

    whole = True

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        return [(t.parts[0], None, None)]

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        return get(t.parts[0], None, None, transposed=True)[e0:e1].contiguous()

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        return [(t.parts[0], None, None, native.transpose(-1, -2))]

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        rows, cols = infos[t.parts[0]].shape
        return (cols, rows)

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {t.parts[0]: (shape[1], shape[0])}

    def native_dtype(self) -> str | None:
        return None


class Squeeze:
    """An hf ``[1, N]`` held as ``[N]`` (ERNIE 4.5's ``moe_statics.e_score_correction_bias``, which NeMo
    moves into the router as a vector); the way back restores the leading 1. A few bytes: one unit."""

    whole = True

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        return [(t.parts[0], None, None)]

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        return get(t.parts[0], None, None).squeeze(0)[e0:e1]

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        return [(t.parts[0], None, None, native.unsqueeze(0))]

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        info = infos[t.parts[0]]
        if len(info.shape) < 2 or info.shape[0] != 1:
            raise CheckpointError(
                f"{info.file}: {t.parts[0]!r} has shape {list(info.shape)}; it is held without its leading "
                "dimension, which must be 1"
            )
        return info.shape[1:]

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {t.parts[0]: (1, *shape)}

    def native_dtype(self) -> str | None:
        return None


class Unpad(Fp32):
    """An hf tensor stored zero-padded along its last dim, held in fp32 without the padding (Kimi K3's KDA
    ``A_log``: 128 entries stored, one per head used, NeMo's ``from_hf`` keeps those); ``t.rows`` is
    ``[kept, stored]``, the stored length the source's own (NeMo's ``to_hf`` pads to the next multiple of
    128, which a native checkpoint without recast.json goes back to). The way back pads with zeros, so
    only zero padding can be dropped: anything else is refused here, naming the tensor, before it is
    written. A few bytes: one unit."""

    whole = True

    def requests(self, t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
        return [(t.parts[0], None, None)]

    def forward(self, t: NativeTensor, e0: int, e1: int, get: Get) -> torch.Tensor:
        kept, stored = t.rows
        value = get(t.parts[0], None, None)
        padding = value[..., kept:]
        if bool(padding.any() or padding.signbit().any()):  # -0.0 too: the way back pads with +0.0
            raise CheckpointError(
                f"{t.parts[0]!r} holds {stored} entries of which its layout uses {kept}; the other "
                f"{stored - kept} must be zero padding, and are not: dropping them could not be undone"
            )
        return value[..., :kept].float()[e0:e1]

    def inverse_views(
        self, t: NativeTensor, native: torch.Tensor, e0: int
    ) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
        kept, stored = t.rows
        return [(t.parts[0], None, None, torch.nn.functional.pad(native, (0, stored - kept)))]

    def native_shape(self, t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
        kept, stored = t.rows
        info = infos[t.parts[0]]
        if not info.shape or info.shape[-1] != stored or stored < kept:
            raise CheckpointError(
                f"{info.file}: {t.parts[0]!r} has shape {list(info.shape)}; its layout holds {kept} entries "
                "along the last dimension, stored with zero padding or without"
            )
        return (*info.shape[:-1], kept)

    def hf_shapes(self, t: NativeTensor, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {t.parts[0]: (*shape[:-1], t.rows[1])}


OPERATIONS: dict[str, Operation] = {
    "copy": Copy(), "transpose": Concat(), "stack": Stack(), "zeros": Zeros(), "concat": Concat(),
    "fp32": Fp32(), "split": Split(), "transpose2d": Transpose2d(), "squeeze": Squeeze(), "unpad": Unpad(),
}  # fmt: skip


def whole(kind: str) -> bool:
    """Whether a native tensor of this kind is produced and checked in one unit (``Operation.whole``)."""
    return kind in OPERATIONS and OPERATIONS[kind].whole
