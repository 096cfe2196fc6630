"""Host buffers reused from one work unit to the next.

Every fresh buffer of more than 32 MiB is a fresh mmap from glibc, and the kernel zeroes and maps its
pages one fault at a time on first touch: on the H200, converting 8.7 GB spent ~20 s of system time
faulting in read buffers and device-to-host copies, on the threads the pipeline waits for. Buffers
taken here keep their pages: a unit's reads go back when the unit has run, a piece copied from the
GPU goes back once it is written and hashed. Used on the GPU path only: on the CPU a written piece
can be the very buffer that was read (an unquantized tensor copied as is), and the CPU's small units
stay under glibc's mmap threshold anyway.
"""

from __future__ import annotations

import threading

import torch

GRAIN = 8 << 20  # size classes: buffers are rounded up to this, so similar units share them
# A free buffer up to this many times the size asked for serves the request: with exact classes only,
# the pool kept each class's high-water mark, and DeepSeek-V4's eight classes held 5.8 GiB of buffers
# for 3.5 GiB ever lent at once (H200, 4.6 GB V4-Flash-shaped checkpoint); with this, 5.45 GiB. The
# rest is classes too far apart to share (8-56 MiB against 144-256 MiB), which the peak rule bounds.
FIT = 2
# Free buffers kept whatever the peak rule says (HostPool): the working set's mix of sizes shifts, and a
# buffer let go is faulted in afresh when its size comes back.
IDLE = 1 << 30


class HostPool:
    """Buffers lent and kept for reuse, the pool holding at most as many bytes, lent and free together, as
    it ever lent at once, or ``IDLE`` free ones: a buffer given back beyond both is let go (its pages go
    back to the system).

    So the pool holds the conversion's working set, not every size class's high-water mark (V4-shaped on
    the H200: peak RSS 4.73 GiB where keeping every buffer reached 6.61), and it never lets go of a
    buffer the working set will ask for again: a fixed cap of 1 GiB on free buffers did, and Kimi K3's mix
    of unit sizes then faulted fresh pages in all run long. H200, 12-layer K3-shaped checkpoint, serial I/O
    floor 20.7 s: 35.4 s with the 1 GiB cap alone, 29.7 s with this rule (peak RSS 5.86 GiB), 27.4 s with
    an 8 GiB cap (5.64 GiB; on the V4-shaped one, keeping every buffer reached 6.61 GiB).
    """

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}
        self._idle = 0  # bytes in self._free
        self._out = 0  # bytes lent
        self._peak = 0  # the most bytes lent at once
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` whose storage this pool lends out."""
        size = -(-max(nbytes, 1) // GRAIN) * GRAIN
        with self._lock:
            fits = sorted(n for n, free in self._free.items() if free and size <= n <= FIT * size)
            buf = self._free[fits[0]].pop() if fits else None
            self._idle -= buf.numel() if buf is not None else 0
        if buf is None:
            buf = torch.empty(size, dtype=torch.uint8)
        with self._lock:
            self._lent[buf.data_ptr()] = buf
            self._out += buf.numel()
            self._peak = max(self._peak, self._out)
        return buf[:nbytes]

    def give(self, t: torch.Tensor) -> None:
        """Return the buffer behind ``t`` if this pool lent it; anything else is left alone."""
        if t.device.type != "cpu":
            return
        with self._lock:
            buf = self._lent.pop(t.untyped_storage().data_ptr(), None)
            if buf is None:
                return
            self._out -= buf.numel()
            if self._idle + self._out + buf.numel() <= self._peak or self._idle + buf.numel() <= IDLE:
                self._free.setdefault(buf.numel(), []).append(buf)
                self._idle += buf.numel()

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` copied into a pooled host buffer (``x`` itself if it is already on the host)."""
        if x.device.type == "cpu":
            return x
        x = x.contiguous()
        host = self.take(x.numel() * x.element_size()).view(x.dtype).view(x.shape)
        host.copy_(x)
        return host
