"""The background copy jobs (jobs.py) on the real engine in this process:
what they copy, and how pause, resume, rate and failures steer them.
Driven through the command table (tests/live.py); read back through
``status``, as an admin sees them."""
from __future__ import annotations

import errno
import time

from lunclone import faults
from helpers import EXT, SMALL as SIZE
NEXT = SIZE // EXT


def status(live, name: str = "src") -> dict:
    return live.cmd("status", name=name)


def restore(live) -> dict:
    return status(live)["restore"]


def damaged(live, extents) -> bytes:
    """Fractured clone c1 of src (pattern data), then the given extents of
    src overwritten: returns the clone's bytes."""
    data = bytes(k % 251 for k in range(SIZE))
    live.fractured_clone(size=SIZE, data=data)
    for i in extents:
        live.write("src", b"D" * EXT, i * EXT)
    return data


def test_restore_job_copies_exactly_the_delta_extents(live):
    exts = [1, 2, 3, 10, 40, NEXT - 1]
    data = damaged(live, exts)
    live.cmd("restore", source="src", clone_name="c1")
    live.wait(lambda: restore(live)["state"] == "done", what="restore done")
    r = restore(live)
    assert r["total_extents"] == len(exts)
    assert r["copied_bytes"] == len(exts) * EXT and r["on_demand_extents"] == 0
    assert live.whole("src") == data
    assert status(live)["clones"][0]["state"] == "fractured"


def test_sync_job_copies_only_the_allocated_extents(live):
    live.cmd("create", name="src", size=SIZE)
    live.write("src", b"a" * (2 * EXT), 5 * EXT)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == live.file("src")
    assert status(live, "c1")["allocated"] <= 2 * EXT  # the holes were not copied


def test_a_paused_restore_copies_nothing_until_resumed(live):
    data = damaged(live, range(NEXT))
    live.cmd("restore", source="src", clone_name="c1", rate_limit="256K")
    live.cmd("restore_pause", source="src")
    time.sleep(0.3)  # a copy started before the pause ends
    before = restore(live)
    assert before["state"] == "paused" and before["pending_extents"] > 0
    time.sleep(0.7)
    after = restore(live)
    assert after["copied_bytes"] == before["copied_bytes"]
    assert after["pending_extents"] == before["pending_extents"]
    live.cmd("restore_rate", source="src", limit="0")
    live.cmd("restore_resume", source="src")
    live.wait(lambda: restore(live)["state"] == "done", what="restore done")
    assert live.whole("src") == data


def test_rate_limit_bounds_the_bytes_copied(live):
    damaged(live, range(NEXT))
    limit = 256 * 1024
    t0 = time.monotonic()
    live.cmd("restore", source="src", clone_name="c1", rate_limit=str(limit))
    time.sleep(1.5)
    copied = restore(live)["copied_bytes"]
    elapsed = time.monotonic() - t0
    assert 0 < copied <= limit * elapsed + EXT, (copied, elapsed)
    assert restore(live)["state"] == "running"
    live.cmd("restore_rate", source="src", limit="0")  # unlimited: it ends at once
    live.wait(lambda: restore(live)["state"] == "done", timeout=10, what="restore done")


def test_a_copy_that_keeps_failing_pauses_the_job_with_its_error(live):
    data = damaged(live, [3, 4])

    def fail():
        raise OSError(errno.EIO, "injected copy failure")
    faults.arm("copy.data_written", fail)
    live.cmd("restore", source="src", clone_name="c1")
    live.wait(lambda: restore(live)["state"] == "paused", timeout=20, what="paused on errors")
    r = restore(live)
    assert "copy failed" in r["error"] and r["pending_extents"] == 2
    faults.disarm()
    live.cmd("restore_resume", source="src")
    live.wait(lambda: restore(live)["state"] == "done", what="restore done")
    assert restore(live)["error"] is None
    assert live.whole("src") == data
