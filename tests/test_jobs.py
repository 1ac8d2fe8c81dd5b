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


def test_a_job_takes_a_tenth_of_the_time_while_the_host_is_busy(live):
    """After a copy during which host requests came in, the job waits nine
    times as long as the copy took (HOST_SHARE); after a quiet one it goes
    on at once."""
    import asyncio
    from lunclone import jobs
    live.pending_restore(paused=True)
    job = live.engine.jobs.get(jobs.JobKey("restore", "src"))
    source = live.volume("src")

    def yield_after(busy: bool) -> float:
        async def run() -> float:
            seen = source.reads + source.writes
            if busy:
                live.read("src", 0, 4096)  # (a pending extent: read from the clone)
            t0 = time.monotonic()
            await job._yield_to_host(seen, took=0.02)
            return time.monotonic() - t0
        return asyncio.run_coroutine_threadsafe(run(), live.engine.loop).result(10)

    share = jobs.HOST_SHARE
    assert yield_after(busy=True) >= 0.02 * (1 - share) / share * 0.95
    assert job.host_busy and job.window() == 1  # (two copies would take twice the share)
    assert yield_after(busy=False) < 0.05
    assert not job.host_busy


def test_while_the_host_is_busy_a_copy_writes_its_data_back_itself(live, monkeypatch):
    """Host writes wait for commits of their map bits, and a commit first
    fdatasyncs what jobs copied: while the host is busy, a job's copy
    fdatasyncs both local ends in its own thread, so the commit finds its
    data written back already.  The restore still ends with the clone's
    data."""
    import threading
    committer = live.engine.committer
    real = committer.sync_volume
    synced: list[tuple[int, str]] = []

    def recording(fd: int) -> None:
        synced.append((fd, threading.current_thread().name))
        real(fd)
    monkeypatch.setattr(committer, "sync_volume", recording)
    data = damaged(live, range(NEXT))
    live.cmd("restore", source="src", clone_name="c1", rate_limit="4M")  # many small copies
    done = threading.Event()

    def host() -> None:
        while not done.is_set():
            live.read("src", (NEXT - 1) * EXT, 4096)
            time.sleep(0.001)
    reader = threading.Thread(target=host)
    reader.start()
    try:
        live.wait(lambda: restore(live)["state"] == "done", what="restore done")
    finally:
        done.set()
        reader.join()
    by_copies = {fd for fd, thread in synced if thread.startswith("lunclone-copy")}
    assert {live.volume("src").fd, live.volume("c1").fd} <= by_copies
    assert live.whole("src") == data


def test_alone_a_job_leaves_the_write_back_to_the_commit(live, monkeypatch):
    """With no host request, one fdatasync per commit costs less than one
    per copy: the copies do not sync."""
    import threading
    committer = live.engine.committer
    real = committer.sync_volume
    threads: list[str] = []

    def recording(fd: int) -> None:
        threads.append(threading.current_thread().name)
        real(fd)
    monkeypatch.setattr(committer, "sync_volume", recording)
    data = damaged(live, range(NEXT))
    live.cmd("restore", source="src", clone_name="c1", rate_limit="4M")
    live.wait(lambda: restore(live)["state"] == "done", what="restore done")
    assert not [t for t in threads if t.startswith("lunclone-copy")]
    assert live.whole("src") == data
