"""SIGKILL of the daemon at random points of a restore while a writer issues
flushed writes; after each restart the restore resumes, and at the end every
byte is what a restore without the crash gives, with every flushed write kept.

``--long`` tries hundreds of points and prints the count of points tried and
of mismatches."""
import random
import time

import pytest

from helpers import wait_clone_state, whole
from workloads import ReconnectingClient, run_crash_points



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
