"""SIGKILL of the daemon at random points of a restore while a writer issues
flushed writes; after each restart the restore resumes, and at the end every
byte is what a restore without the crash gives, with every flushed write kept.

``--long`` tries hundreds of points and prints the count of points tried and
of mismatches."""
import random
import threading
import time

import nbd
import pytest

from helpers import read_bitmap, wait_for
from test_clones import whole
from test_restore import EXT, SIZE, prepare, restore_status

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
        return prepare(daemon, rng, remote=remote)
    daemon.cli("clone", "sync", "c1")
    wait_for(lambda: daemon.json("status", "src")["clones"][0]["state"] == "synchronized", 120)
    daemon.cli("clone", "fracture", "c1")
    src = daemon.connect("src")
    for _ in range(40):
        src.pwrite(rng.randbytes(EXT), rng.randrange(0, SIZE // EXT) * EXT)
    src.flush()
    return whole(daemon.connect("c1"), SIZE), src


@pytest.mark.timeout(1800)  # --long: hundreds of crash points
def test_sigkill_during_restore(daemon, long_mode):
    points = 300 if long_mode else 20
    tried, mismatches = run_crash_points(daemon, points, seed=1)
    print(f"crash points tried: {tried}, mismatches: {mismatches}")
    assert tried >= points and mismatches == 0


class SourceWriter(ReconnectingClient):
    """Random writes to the source, some flushed, until stopped."""

    def __init__(self, daemon, size, seed):
        super().__init__(daemon, seed)
        self.size = size

    def one(self, h):
        off = self.rng.randrange(0, self.size // 512 - 200) * 512
        h.pwrite(self.rng.randbytes(self.rng.choice([512, 4096, 70_000])), off)
        if self.rng.random() < 0.3:
            h.flush()


@pytest.mark.timeout(1800)  # --long: hundreds of crash points
def test_sigkill_during_sync_and_mirroring(daemon, long_mode):
    """Kill -9 during initial sync, re-sync and mirrored writes: after the
    restarts the clone converges to the source, byte for byte."""
    from helpers import wait_clone_state
    points = 200 if long_mode else 12
    size = 32 << 20
    rng = random.Random(2)
    daemon.cli("create", "src", "--size", str(size))
    src = daemon.connect("src")
    src.pwrite(rng.randbytes(size), 0)
    src.flush()
    del src
    daemon.cli("clone", "create", "src", "c1")
    w = SourceWriter(daemon, size, 9)
    w.start()
    for k in range(points):
        time.sleep(rng.uniform(0.01, 0.3))
        w.up.clear()
        daemon.kill()
        daemon.start()
        w.up.set()
        state = daemon.json("status", "src")["clones"][0]["state"]
        if state == "synchronized" and k % 3 == 0:
            daemon.cli("clone", "fracture", "c1")
            time.sleep(0.1)
            daemon.cli("clone", "sync", "c1")
    w.stop.set()
    w.join(30)
    wait_clone_state(daemon, "src", "c1", "synchronized")
    assert whole(daemon.connect("src"), size) == whole(daemon.connect("c1"), size)
    print(f"sync/mirror crash points tried: {points}, mismatches: 0")
