"""The output's shards, fixed before any tensor is computed: names, headers and where each key lives.

Either planned by Recast (tensors in the order they will be produced), or a source's own shard headers
reused verbatim, which is how ``--quantize keep`` gives back a checkpoint byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .safetensors_io import PlannedTensor
from .shard_stream import Slot, planned_header, slots_of


@dataclass
class Layout:
    shards: list[list[PlannedTensor]] = field(default_factory=list)
    raw_headers: dict[str, bytes] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    _slots: dict[str, dict[str, Slot]] = field(default_factory=dict)

    def names(self) -> list[str]:
        if self.raw_headers:
            return list(self.raw_headers)
        n = len(self.shards)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def fix(self) -> None:
        """Record which shard holds each key, once the shards are decided."""
        for name in self.names():
            for key in self.slots(name):
                self.where[key] = name

    def header(self, name: str) -> bytes:
        if self.raw_headers:
            return self.raw_headers[name]
        return planned_header(self.shards[self.names().index(name)])

    def slots(self, name: str) -> dict[str, Slot]:
        if name not in self._slots:
            self._slots[name] = self._read_slots(name)
        return self._slots[name]

    def offset(self, key: str) -> int:
        return self.slots(self.where[key])[key].start

    def _read_slots(self, name: str) -> dict[str, Slot]:
        if not self.raw_headers:
            return slots_of(self.shards[self.names().index(name)])
        header = json.loads(self.raw_headers[name])
        header.pop("__metadata__", None)
        return {
            k: Slot(v["data_offsets"][0], v["data_offsets"][1], v["dtype"], tuple(v["shape"]))
            for k, v in header.items()
        }

    def total_bytes(self) -> int:
        return sum(s.end - s.start for name in self.names() for s in self.slots(name).values())
