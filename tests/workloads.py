"""Host workloads shared by the integration tests: libnbd clients doing
random I/O checked against a model while a restore runs, and the SIGKILL
crash-point loop of a restore (local, remote, Ceph, network clones).

They drive a ``helpers.Daemon``; the scenarios they start from are in
helpers.py."""
from __future__ import annotations

import random
import threading
import time

import nbd

from helpers import (EXT, MiB, SIZE, fractured_then_damaged, read_bitmap, restore_status,
                     wait_for, wait_restore_done, whole)


class Worker(threading.Thread):
    """One libnbd connection doing random I/O in its own stripes of the volume,
    checking every read against the model as it goes."""

    def __init__(self, h, model, lock, stripes, seed, ops, extent=EXT):
        super().__init__()
        self.h, self.model, self.lock, self.stripes = h, model, lock, stripes
        self.rng = random.Random(seed)
        self.ops = ops
        self.extent = extent
        self.touched: set[int] = set()
        self.error: BaseException | None = None

    def run(self):
        try:
            for _ in range(self.ops):
                self.one()
        except BaseException as e:
            self.error = e

    def one(self):
        rng, h, model = self.rng, self.h, self.model
        s0, s1 = rng.choice(self.stripes)
        kind = rng.choice(["partial", "whole", "multi", "trim", "zero", "read", "read"])
        if kind == "partial":
            off, ln = s0 + rng.randrange(0, s1 - s0 - 4096) & ~511, rng.choice([512, 4096, 10_000])
        elif kind == "whole":
            off, ln = s0 + rng.randrange(0, (s1 - s0) // self.extent) * self.extent, self.extent
        elif kind == "multi":
            off = s0 + rng.randrange(0, (s1 - s0) // 2) & ~511
            ln = rng.randrange(self.extent, 3 * self.extent) & ~511
        else:
            off = s0 + rng.randrange(0, s1 - s0 - self.extent) & ~511
            ln = rng.choice([4096, self.extent, 2 * self.extent + 512])
        ln = min(ln, s1 - off)
        if kind == "read":
            got = h.pread(ln, off)
            assert got == bytes(model[off:off + ln]), f"read at {off}+{ln} differs from the model"
            return
        if kind in ("trim", "zero"):
            (h.trim if kind == "trim" else h.zero)(ln, off)
            data = bytes(ln)
        else:
            data = rng.randbytes(ln)
            h.pwrite(data, off)
        model[off:off + ln] = data
        self.touched.update(range(off // self.extent, (off + ln - 1) // self.extent + 1))


def stripes_for(n_workers, size, stripe=MiB):
    out = [[] for _ in range(n_workers)]
    for k, off in enumerate(range(0, size, stripe)):
        out[k % n_workers].append((off, off + stripe))
    return out


def host_io(daemon, first, shown: bytes, seed: int, ops: int):
    """Four connections (``first`` and three more) do random I/O of every
    shape on ``src``, checked against a model that starts as ``shown``
    (what the source shows now).  Returns (model, extents the host wrote)."""
    model = bytearray(shown)
    conns = [first] + [daemon.connect("src") for _ in range(3)]
    workers = [Worker(h, model, None, st, seed + k, ops)
               for k, (h, st) in enumerate(zip(conns, stripes_for(4, SIZE)))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for w in workers:
        if w.error:
            raise w.error
    return model, set().union(*(w.touched for w in workers))


def host_io_during_restore(daemon, first, clone_data: bytes, seed: int, ops: int):
    """``host_io`` while a slow restore of ``src`` runs; then the restore
    goes on to the end and every byte of ``src`` is compared with the
    model.  Returns (model, extents the host wrote)."""
    model, touched = host_io(daemon, first, clone_data, seed, ops)
    assert restore_status(daemon, "src")["state"] == "running", \
        "the restore ended before the host writes did"
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    assert whole(daemon.connect("src"), SIZE) == bytes(model)
    return model, touched


BLOCK = 4096


class Model:
    """Expected content; blocks an interrupted request may or may not have
    changed have an alternative."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.alts: dict[int, bytearray] = {}
        self.lock = threading.Lock()

    def apply(self, off: int, new: bytes, certain: bool) -> None:
        with self.lock:
            end = off + len(new)
            for b in range(off // BLOCK, (end - 1) // BLOCK + 1):
                b0 = b * BLOCK
                lo, hi = max(off, b0), min(end, b0 + BLOCK)
                if certain:
                    alt = self.alts.get(b)
                    if alt is not None:
                        alt[lo - b0:hi - b0] = new[lo - off:hi - off]
                        if lo == b0 and hi == b0 + BLOCK:  # fully rewritten
                            del self.alts[b]
                elif b not in self.alts:
                    self.alts[b] = bytearray(self.data[b0:b0 + BLOCK])
            self.data[off:end] = new

    def mismatches(self, got: bytes, off: int = 0) -> list[int]:
        bad = []
        with self.lock:
            for b in range(off // BLOCK, (off + len(got)) // BLOCK):
                b0 = b * BLOCK
                blk = got[b0 - off:b0 - off + BLOCK]
                if blk != self.data[b0:b0 + BLOCK] and blk != self.alts.get(b):
                    bad.append(b0)
        return bad


class ReconnectingClient(threading.Thread):
    """Calls ``one(h)`` on the source until stopped; reconnects after the
    daemon is killed and ``up`` is set again."""

    def __init__(self, daemon, seed: int):
        super().__init__(daemon=True)
        self.d = daemon
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.up = threading.Event()
        self.up.set()
        self.error: BaseException | None = None

    def run(self):
        h = None
        while not self.stop.is_set():
            try:
                if h is None:
                    self.up.wait()
                    h = self.d.connect("src")
                self.one(h)
            except nbd.Error:
                h = None
                time.sleep(0.02)
            except BaseException as e:
                self.error = e
                return

    def one(self, h) -> None:
        raise NotImplementedError


class FlushedWriter(ReconnectingClient):
    """Flushed writes of every shape and checked reads in [0, span)."""

    def __init__(self, daemon, model: Model, seed: int, span: int = SIZE):
        super().__init__(daemon, seed)
        self.model = model
        self.span = span
        self.touched: set[int] = set()
        self.uncertain: set[int] = set()
        self.ops = 0

    def one(self, h):
        rng = self.rng
        kind = rng.choice(["partial", "whole", "trim", "read"])
        if kind == "read":
            off = rng.randrange(0, self.span // BLOCK - 16) * BLOCK
            got = h.pread(16 * BLOCK, off)
            bad = self.model.mismatches(got, off)
            assert not bad, f"read at {off}: blocks {bad[:4]} differ from the model"
            return
        if kind == "whole":
            off, ln = rng.randrange(0, self.span // EXT) * EXT, EXT
        else:
            off = rng.randrange(0, self.span // 512 - 64) * 512
            ln = rng.choice([512, 4096, 20_000])
        new = bytes(ln) if kind == "trim" else rng.randbytes(ln)
        exts = set(range(off // EXT, (off + ln - 1) // EXT + 1))
        try:
            (h.trim(ln, off) if kind == "trim" else h.pwrite(new, off))
            h.flush()
        except nbd.Error:
            self.model.apply(off, new, certain=False)
            self.uncertain |= exts
            raise
        self.model.apply(off, new, certain=True)
        self.touched |= exts
        self.ops += 1


def run_crash_points(daemon, points: int, seed: int, remote: str | None = None,
                     ) -> tuple[int, int]:
    """Restores with SIGKILLs at random points; ``remote``: the clone's NBD URI."""
    rng = random.Random(seed)
    tried = mismatches = 0
    cycle = 0
    while tried < points:
        cycle += 1
        clone_data, src = prepare_cycle(daemon, rng, cycle, remote)
        model = Model(clone_data)
        daemon.cli("restore", "src", "--from", "c1", "--rate", "384K")
        w = FlushedWriter(daemon, model, seed * 100 + cycle)
        w.start()
        while tried < points:
            time.sleep(rng.uniform(0.02, 0.5))
            w.up.clear()
            daemon.kill()
            tried += 1
            daemon.start()
            w.up.set()
            if (restore_status(daemon, "src") or {}).get("state") == "done":
                break
        time.sleep(0.2)
        w.stop.set()
        w.join(30)
        if w.error:
            raise w.error
        daemon.cli("restore", "rate", "src", "0", check=False)
        wait_for(lambda: restore_status(daemon, "src")["state"] == "done", 120,
                 what="restore done")
        bad = model.mismatches(whole(daemon.connect("src"), SIZE))
        mismatches += len(bad)
        assert whole(daemon.connect("c1"), SIZE) == clone_data, "the clone changed"
        delta = read_bitmap(daemon.state_dir, "c1", "delta")
        assert w.touched <= delta <= w.touched | w.uncertain, "delta != protected map"
        assert not bad, f"cycle {cycle}: {len(bad)} blocks differ, first at {bad[:5]}"
        print(f"cycle {cycle}: {tried} points so far, writer {w.ops} flushed ops")
    return tried, mismatches


def prepare_cycle(daemon, rng, cycle, remote=None):
    if cycle == 1:
        return fractured_then_damaged(daemon, rng, remote=remote)
    daemon.cli("clone", "sync", "c1")
    wait_for(lambda: daemon.json("status", "src")["clones"][0]["state"] == "synchronized", 120)
    daemon.cli("clone", "fracture", "c1")
    src = daemon.connect("src")
    for _ in range(40):
        src.pwrite(rng.randbytes(EXT), rng.randrange(0, SIZE // EXT) * EXT)
    src.flush()
    return whole(daemon.connect("c1"), SIZE), src
