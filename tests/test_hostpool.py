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


def test_the_pool_holds_at_most_what_it_ever_lent_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostpool, "IDLE", 0)
    pool = HostPool()
    lent = [pool.take(24 * MIB) for _ in range(3)]  # 72 MiB lent at once
    for t in lent:
        pool.give(t)
    assert pool._idle == 72 * MIB  # all kept: the working set will ask for them again
    small = pool.take(5 * MIB)  # an 8 MiB class none of them serves: 80 MiB held, more than ever lent
    pool.give(small)
    assert pool._idle == 72 * MIB and 8 * MIB not in pool._free  # so it is let go
    again = [pool.take(24 * MIB) for _ in range(3)]
    assert {_ptr(t) for t in again} == {_ptr(t) for t in lent} and pool._idle == 0


def test_free_buffers_up_to_idle_are_kept_beyond_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostpool, "IDLE", 40 * MIB)
    pool = HostPool()
    pool.give(pool.take(24 * MIB))
    pool.give(pool.take(5 * MIB))  # 8 MiB: 32 MiB held, more than the 24 ever lent, but within IDLE
    assert pool._idle == 32 * MIB and sorted(pool._free) == [8 * MIB, 24 * MIB]


def test_only_its_own_buffers_come_back() -> None:
    pool = HostPool()
    pool.give(torch.empty(8 * MIB, dtype=torch.uint8))  # not lent by this pool: left alone
    assert pool._idle == 0 and not pool._free
