"""The GPU path's host buffer pool: what it reuses and what it lets go (bench/gpu_scale.py has the figures)."""

from __future__ import annotations

import pytest
import torch

from worker.engine import hostpool
from worker.engine.hostpool import HostPool

MIB = 1 << 20


def _ptr(t) -> int:
    return t.untyped_storage().data_ptr()


def test_a_free_buffer_up_to_twice_the_size_serves_a_request() -> None:
    pool = HostPool()
    big = pool.take(20 * MIB)  # a 24 MiB buffer
    pool.give(big)
    smaller = pool.take(15 * MIB)  # 16 MiB asked: the free 24 MiB one serves
    assert _ptr(smaller) == _ptr(big) and smaller.numel() == 15 * MIB
    pool.give(smaller)
    small = pool.take(5 * MIB)  # 8 MiB asked: 24 MiB is more than twice that, so a buffer of its own
    assert _ptr(small) != _ptr(big)


def test_idle_buffers_beyond_the_cap_are_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostpool, "IDLE", 40 * MIB)
    pool = HostPool()
    lent = [pool.take(24 * MIB) for _ in range(3)]
    for t in lent:
        pool.give(t)
    # one 24 MiB buffer kept (a second would pass the 40 MiB cap), the other two let go
    assert pool._idle == 24 * MIB and [len(free) for free in pool._free.values()] == [1]
    assert _ptr(pool.take(24 * MIB)) == _ptr(lent[0]) and pool._idle == 0


def test_only_its_own_buffers_come_back() -> None:
    pool = HostPool()
    pool.give(torch.empty(8 * MIB, dtype=torch.uint8))  # not lent by this pool: left alone
    assert pool._idle == 0 and not pool._free
