"""The I/O path: what a host request does to a volume.

nbdkit's worker threads call these methods synchronously (thread model
PARALLEL).  The hot path, used while a volume has no clone and no job, is
a policy check and one system call: ``Volume.policy is None``.

Anything else (delta tracking, mirroring, copy on demand during a
restore) is a Policy object, installed with ``Volume.set_policy``; the
restore rules live in ``policy.py``.

Switching policy is safe against writes that already passed the policy
check: a write is entered in its generation's in-flight list (``list.append``
and ``list.pop``: one C call each, atomic under the GIL and on a
free-threaded build) *before* it reads the policy.  A switch installs the
new policy, starts a new generation, and waits until the old generation's
list is empty (``WriteBarrier``): every write that could have read the old
policy has then ended, and writes that start meanwhile count in the new
generation, so they cannot release the wait early.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Protocol

from . import volume as vf
from .errors import Busy
from .store import Store


class Policy(Protocol):
    plain_reads: bool  # reads need nothing but the volume's own data

    def pread(self, vol: "Volume", buf, offset: int) -> None: ...
    def pwrite(self, vol: "Volume", buf, offset: int, fua: bool) -> None: ...
    def trim(self, vol: "Volume", count: int, offset: int, fua: bool) -> None: ...
    def zero(self, vol: "Volume", count: int, offset: int, fua: bool,
             may_trim: bool, fast: bool) -> None: ...
    def extents(self, vol: "Volume", count: int, offset: int,
                one: bool) -> list[tuple[int, int, bool]]: ...
    def flush(self, vol: "Volume") -> None: ...


LATENCY_MASK = 63  # time one request in 64
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Request latency in seconds, Prometheus-style cumulative buckets."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for k, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[k] += 1
                return
        self.counts[-1] += 1


class WriteBarrier:
    """Writes in progress, by generation: ``enter`` returns the list to give
    back to ``leave``; ``switch`` starts a new generation and returns the
    old one's list, empty once every write of that generation has ended."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: list[None] = []

    def switch(self) -> list[None]:
        old, self.current = self.current, []
        return old


def drain(old: list[None], timeout: float, name: str) -> None:
    """Wait (blocking) until a generation's writes have ended."""
    deadline = time.monotonic() + timeout
    while old:
        if time.monotonic() > deadline:
            raise Busy(f"writes to {name} did not finish in {timeout:.0f} s; try again")
        time.sleep(0.0002)


async def quiesce(old: list[None], timeout: float, name: str) -> None:
    """The same on the asyncio loop, without blocking it: a write may be
    waiting for a copy whose end runs on the loop."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while old:
        if time.monotonic() > deadline:
            raise Busy(f"writes to {name} did not finish in {timeout:.0f} s; try again")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.01)


class Volume:
    """A served volume: where its bytes live, its geometry and current policy.

    ``fd`` is the local file's descriptor for the hot path; a volume kept
    on another system (a remote clone) has ``fd == -1`` and always has a
    policy that goes through its ``store``."""

    def __init__(self, name: str, store: Store, size: int, extent_size: int):
        self.name = name
        self.store = store
        self.path = store.path
        self.size = size
        self.extent_size = extent_size
        self.shift = extent_size.bit_length() - 1
        self.fd = store.fd
        self.policy: Policy | None = None
        self.connections = 0
        self.barrier = WriteBarrier()
        self.reads = self.writes = self.read_bytes = self.write_bytes = 0
        self.latency = Histogram()

    def close(self) -> None:
        self.store.close()
        self.fd = -1

    # -- policy switching --------------------------------------------------
    def set_policy(self, policy: Policy | None) -> None:
        """Install ``policy`` and wait (blocking) for writes that began
        before it; only where no write can wait on the loop (start-up)."""
        drain(self.switch_policy(policy), 60.0, self.name)

    def switch_policy(self, policy: Policy | None) -> list[None]:
        """Install ``policy``; return the generation of writes that may
        have read the old one (``quiesce`` it)."""
        self.policy = policy
        return self.barrier.switch()

    # -- host requests -----------------------------------------------------
    # Counters for metrics are plain ``+=``: under heavy parallel load a few
    # increments may be lost (no lock on the hot path); one request in
    # LATENCY_MASK + 1 is timed for the latency histogram.
    def pread(self, buf, offset: int) -> None:
        self.reads += 1
        self.read_bytes += len(buf)
        t0 = 0.0 if self.reads & LATENCY_MASK else time.perf_counter()
        policy = self.policy
        if policy is None or policy.plain_reads:
            if os.preadv(self.fd, [buf], offset) != len(buf):
                vf.read_into(self.fd, buf, offset)
        else:
            policy.pread(self, buf, offset)
        if t0:
            self.latency.observe(time.perf_counter() - t0)

    def pwrite(self, buf, offset: int, fua: bool) -> None:
        self.writes += 1
        self.write_bytes += len(buf)
        t0 = 0.0 if self.writes & LATENCY_MASK else time.perf_counter()
        gen = self.barrier.current
        gen.append(None)
        try:
            policy = self.policy
            if policy is None:
                if os.pwrite(self.fd, buf, offset) != len(buf):
                    vf.write_from(self.fd, buf, offset)
                if fua:
                    os.fdatasync(self.fd)
            else:
                policy.pwrite(self, buf, offset, fua)
        finally:
            gen.pop()
            if t0:
                self.latency.observe(time.perf_counter() - t0)

    def trim(self, count: int, offset: int, fua: bool) -> None:
        gen = self.barrier.current
        gen.append(None)
        try:
            policy = self.policy
            if policy is None:
                self.punch(offset, count, fua)
            else:
                policy.trim(self, count, offset, fua)
        finally:
            gen.pop()

    def zero(self, count: int, offset: int, fua: bool, may_trim: bool = True,
             fast: bool = False) -> None:
        """NBD WRITE_ZEROES: a hole if the client allows trimming (MAY_TRIM),
        else allocated zeroes; ``fast`` asks to fail with ENOTSUP rather
        than do slow work (a copy on demand)."""
        gen = self.barrier.current
        gen.append(None)
        try:
            policy = self.policy
            if policy is None:
                if may_trim:
                    self.punch(offset, count, fua)
                else:
                    self.store.zero(offset, count, may_trim=False)
                    if fua:
                        os.fdatasync(self.fd)
            else:
                policy.zero(self, count, offset, fua, may_trim, fast)
        finally:
            gen.pop()

    def flush(self) -> None:
        """In the barrier too: a switch (a clone's delete) waits for flushes
        that may still reach the mirrors of the old rules."""
        gen = self.barrier.current
        gen.append(None)
        try:
            policy = self.policy
            if policy is None:
                os.fdatasync(self.fd)
            else:
                policy.flush(self)
        finally:
            gen.pop()

    def extents(self, count: int, offset: int, one: bool) -> list[tuple[int, int, bool]]:
        """Block status: (offset, length, is_hole) runs.  During a restore
        the policy answers for what a read returns, not the file's holes."""
        policy = self.policy
        if policy is not None and not policy.plain_reads:
            return policy.extents(self, count, offset, one)
        return self.store.extents(offset, count, one)

    # -- raw helpers for policies ----------------------------------------------
    def punch(self, offset: int, count: int, fua: bool) -> None:
        """Trim and zero both punch a hole: a hole reads back as zeroes."""
        vf.punch_hole(self.fd, offset, count)
        if fua:
            os.fdatasync(self.fd)
