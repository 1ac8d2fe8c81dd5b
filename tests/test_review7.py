"""Review of 70c6315 (while the host is busy a job waits nine times as long
as each copy took, and its copies fdatasync their local ends in the copy
thread: ``CopyJob._yield_to_host``, ``Family.copy_runs(write_back=True)``).

Two things the change brings that no earlier test covered:

- a copy thread's ``sync_volume`` runs without ``commit_lock``, beside a
  group commit's fdatasync of the same file: Linux reports a write-back
  error once, to whichever fdatasync of the descriptor looks first, so the
  commit's own fdatasync may return 0 and the commit writes clears for
  data whose write-back failed (rule 2), which the reload of
  ``_writeback_failed`` then takes from the database as committed; a host
  flush of the source beside a copy's fdatasync succeeds the same way;
- the wait after a copy is part of the job's task, so a clone delete and a
  restore start (``_end_syncs``), which await the job's end, wait for it:
  nine times as long as the last copy took, with no bound.
"""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from lunclone import jobs, policy
from lunclone.jobs import HOST_SHARE, JobKey
from live import EXT, MiB, Hold, pattern

SIZE = 8 * MiB          # 128 extents: a sync takes two copies of 64
NEXT = SIZE // EXT
RUN = 64                # jobs.RUN_EXTENTS: the first copy's extents are 0..63


@pytest.fixture(autouse=True)
def one_copy_at_a_time(monkeypatch):
    """These scenarios are a sequence of copies (the first held, its clears
    waiting, then the next): one local copy in flight at a time."""
    monkeypatch.setattr(jobs, "LOCAL_WINDOW", 1)


def until(pred, timeout: float) -> bool:
    """Poll ``pred`` (in a thread of the engine: never raises)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def sync_job(live, name: str = "c1"):
    return live.engine.jobs.get(JobKey("sync", name))


def busy_first_copy(live, monkeypatch, hold_s: float, clone: str = "c1",
                    while_held=lambda: None) -> float:
    """Create clone ``clone`` of src (SIZE bytes of data); its sync job's
    first copy is held ``hold_s`` seconds while the host reads src, so
    the job sees the host busy.  Returns once the copy returned and the
    job's wait after it has begun; the time that wait lasts."""
    hold = Hold(monkeypatch, policy, "copy_range", lambda src, dst, off, n: True)
    live.cmd("clone_create", source="src", name=clone)
    hold.wait_arrived()
    while_held()
    time.sleep(hold_s)
    live.read("src", (NEXT - 1) * EXT, 4096)  # a host request during the copy
    hold.release()
    job = sync_job(live, clone)
    live.wait(lambda: job.host_busy, timeout=10, what="the job saw the host busy")
    return hold_s * (1 - HOST_SHARE) / HOST_SHARE


class ToldOnce:
    """A write-back error of ``fd``, as Linux reports it: to the first
    fdatasync of the descriptor only; one that runs beside it returns 0.
    The copy thread's fdatasync is the one told, and it stays in progress
    until ``other`` (a thread name) has reached ``sync_volume`` for the same
    file and a moment more, so that a second fdatasync that is not kept
    out runs beside it."""

    def __init__(self, monkeypatch, committer, fd: int, other: str):
        self.fd, self.other = fd, other
        self.armed = False
        self.told, self.arrived, self.returned = (threading.Event(), threading.Event(),
                                                  threading.Event())
        real_fdatasync, real_sync = os.fdatasync, type(committer).sync_volume
        told = self

        def fdatasync(f):
            me = threading.current_thread().name
            if told.armed and f == told.fd and me.startswith("lunclone-copy") \
                    and not told.told.is_set():
                told.told.set()
                until(told.arrived.is_set, 20)
                time.sleep(0.3)  # in progress while the other goes on, if it can
                told.returned.set()
                raise OSError(errno.EIO, "injected write-back error")
            return real_fdatasync(f)  # beside it, or after it: 0

        def sync_volume(self_, f):
            if told.armed and f == told.fd and threading.current_thread().name == told.other:
                told.arrived.set()
            return real_sync(self_, f)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(type(committer), "sync_volume", sync_volume)


def test_a_commit_never_writes_clears_for_a_volume_whose_writeback_failed(live, monkeypatch):
    """The sync job's first copy (extents 0..63) is done and its clears wait
    for a commit.  The job's second copy (the host is busy: write-back in
    the copy thread) fdatasyncs the clone and is the one Linux tells of a
    lost write-back; the commit's fdatasync of the clone, had it run beside
    it, would return 0 and commit the clears of 0..63, which the reload
    then takes from the database as committed (review7: it did).  One
    fdatasync of a file at a time: the commit finds the clone marked
    failed, and writes no clear."""
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"src-", SIZE), 0)
    committer = live.engine.committer
    # The first copy: no write-back in its thread (the job did not know the
    # host was busy yet); its clears wait for the commit, held back here.
    # (taken once the clone exists: its create commits an admin transaction)
    wait_s = busy_first_copy(live, monkeypatch, hold_s=0.3,
                             while_held=committer.commit_lock.acquire)
    try:
        clone = live.clone("c1")
        live.wait(lambda: not any(clone.delta.test(i) for i in range(RUN)),
                  timeout=10, what="the first copy's clears")
        assert all(clone.delta.test(i) for i in range(RUN, NEXT)), "not the state this test is about"
        told = ToldOnce(monkeypatch, committer, clone.volume.fd, "lunclone-commit")
        told.armed = True
        assert told.told.wait(wait_s + 20), "the second copy never fdatasync'ed the clone"
    finally:
        committer.commit_lock.release()  # the commit goes on: its fdatasync of the clone
    assert told.arrived.wait(20), "no commit fdatasync'ed the clone beside the copy"
    live.wait(lambda: clone.volume.fd in committer.failed_fds, timeout=20,
              what="the clone marked failed")
    live.commit()
    on_disk = live.engine.md.load_bitmap("c1", "delta", NEXT)
    cleared = [i for i in range(RUN) if not on_disk.test(i)]
    assert not cleared, (f"the clone's write-back failed (reported to a copy thread), yet "
                         f"{len(cleared)} clears that waited for a commit at that moment are "
                         f"committed (extents {cleared[0]}..{cleared[-1]}); in memory: "
                         f"{sum(not clone.delta.test(i) for i in range(RUN))} clear")


def test_a_clone_delete_does_not_wait_for_the_jobs_host_share_wait(live, monkeypatch):
    """After a copy during which the host read the source, the sync job
    waits nine times as long as the copy took, inside the task that
    ``JobRunner.end`` awaits: a clone delete (and every admin command
    behind it on the admin lock) waits for the whole of it.  A copy slowed
    by a stall of the disk or of the network makes that wait as long."""
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"src-", SIZE), 0)
    wait_s = busy_first_copy(live, monkeypatch, hold_s=0.8)
    t0 = time.monotonic()
    live.cmd("clone_delete", name="c1")
    took = time.monotonic() - t0
    assert took < 2.0, (f"clone delete took {took:.1f} s: it waited for the sync job's "
                        f"host-share wait ({wait_s:.1f} s after a {0.8:.1f} s copy)")


def test_a_restore_start_does_not_wait_for_a_sync_jobs_host_share_wait(live, monkeypatch):
    """``Restores.begin`` stops the sync jobs of the other clones and
    awaits them (``_end_syncs``): it now also waits for the wait after
    their last copy, nine times that copy's duration, before the restore
    even closes its gate; the restore is no longer instant."""
    live.fractured_clone(clone="c2", size=SIZE, data=pattern(b"c2-", SIZE))
    live.write("src", pattern(b"new-", SIZE), 0)
    wait_s = busy_first_copy(live, monkeypatch, hold_s=0.8, clone="c1")
    t0 = time.monotonic()
    live.cmd("restore", source="src", clone_name="c2")
    took = time.monotonic() - t0
    assert took < 2.0, (f"restore start took {took:.1f} s: it waited for c1's sync job's "
                        f"host-share wait ({wait_s:.1f} s)")
    live.wait(lambda: live.cmd("status", name="src")["restore"]["state"] == "done",
              what="restore done")
    assert live.whole("src") == pattern(b"c2-", SIZE)


def test_a_host_flush_beside_a_copy_threads_fdatasync_reports_the_writeback_error(
        live, monkeypatch):
    """A sync job's copy while the host is busy fdatasyncs the source (its
    ``src``) in the copy thread, and Linux tells it of the lost write-back
    of the host's write.  A host FLUSH of the source whose fdatasync ran
    beside it would return 0: the host would believe durable a write whose
    write-back failed (review7: it did; a commit could race a flush so
    before, now every copy does while the host is busy).  One fdatasync of
    a file at a time: the flush finds the source marked failed."""
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"src-", SIZE), 0)
    source_fd = live.volume("src").fd
    busy_first_copy(live, monkeypatch, hold_s=0.2)
    told = ToldOnce(monkeypatch, live.engine.committer, source_fd, "host-flush")
    result: dict = {}

    def host() -> None:
        try:
            live.write("src", b"H" * 4096, 3 * EXT)  # its write-back is what fails
            told.armed = True
            assert told.told.wait(20), "no copy thread fdatasync'ed the source"
            live.volume("src").flush()
            result["flush"] = "ok"
        except OSError as e:
            result["flush"] = e
        except AssertionError as e:
            result["flush"] = e
    t = threading.Thread(target=host, name="host-flush", daemon=True)
    t.start()
    t.join(40)
    assert not isinstance(result.get("flush"), AssertionError), result["flush"]
    live.wait(lambda: source_fd in live.engine.committer.failed_fds, timeout=10,
              what="the source marked failed")
    assert isinstance(result.get("flush"), OSError), (
        "the host's flush succeeded although the write-back error of the source "
        "(its own write's) was reported to the job's copy thread meanwhile")


def test_a_clone_delete_waits_for_a_copy_threads_writeback_before_closing(live, monkeypatch):
    """(Safe.) The write-back in the copy thread uses the stores taken when
    the copy started; a clone delete awaits the job (``JobRunner.end``),
    which awaits its copy threads, before ``forget_fd`` and the close: the
    copy thread's fdatasync never meets a closed or reused descriptor, and
    a failure it reports marks the right file."""
    from lunclone.commit import Committer
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"src-", SIZE), 0)
    busy_first_copy(live, monkeypatch, hold_s=0.1)
    clone_vol = live.volume("c1")
    ino = os.fstat(clone_vol.fd).st_ino
    seen: list[int] = []
    hold = Hold(monkeypatch, Committer, "sync_volume",
                lambda self, fd: threading.current_thread().name.startswith("lunclone-copy"))
    real = os.fdatasync

    def fdatasync(fd):
        if threading.current_thread().name.startswith("lunclone-copy"):
            seen.append(os.fstat(fd).st_ino)
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    hold.wait_arrived(20)  # the second copy's write-back, in its thread
    delete = live.cmd_in_thread("clone_delete", name="c1")
    time.sleep(0.5)
    assert not delete.done() and clone_vol.fd != -1, "the clone was closed under its copy"
    hold.release()
    delete.result(30)
    assert clone_vol.fd == -1
    assert ino in seen, "the copy thread fdatasync'ed another file than the clone's"
