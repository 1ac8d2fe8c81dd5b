"""Review of 77cfb06 (a read within one pending extent, no copy in flight,
no write there, reads the clone without the maps lock:
``Family._read_one_extent``).  The lock-free read trusts the pending and
protected bits it sees; two states the locked path never saw (they exist
only while the lock is held, or for a restore that is not the family's)
made it read the clone where no serial order allows it (both failed on
77cfb06: review6-*-before.txt).
"""
from __future__ import annotations

import threading

import pytest

from lunclone import faults
from lunclone.bitmap import Bitmap
from live import EXT, PENDING, Async, Hold, fail_fdatasync_once, pattern

READER = "review6-reader"


def finish_read(reader: Async, hold) -> bytes:
    """The read's result; a read that waits for the lock the held thread
    holds (the locked path) gets it once the hold is released."""
    reader.thread.join(3.0)
    hold.release()
    return reader.result(10.0)


def test_a_read_during_the_writeback_reload_sees_acknowledged_writes(live, monkeypatch):
    """A write-back error reloads every map from the database under the maps
    lock, keeping the protected bits of acknowledged writes into pending
    extents.  They were set again only after the reload (failed before):
    in between, such an extent was pending and unprotected in memory; the
    locked path could not see that, a lock-free read did and read the
    clone, though the write was acknowledged before the read started.  Now
    the kept bits are in the map the reload assigns."""
    live.pending_restore(paused=True)
    whole, part = b"W" * EXT, b"P" * 4096
    committer = live.engine.committer
    with committer.commit_lock:  # both writes' bits go out in the commit that fails
        live.write("src", whole, 21 * EXT)              # whole: protected after the data
        live.write("src", part, 22 * EXT + 512)         # partial: copy on demand, protected
        hit = fail_fdatasync_once(monkeypatch, live.clone("c1").volume.fd)
        # Held just after the protected map is put back to the database's.
        hold = Hold(monkeypatch, Bitmap, "assign",
                    lambda bm, other: bm.key is not None and bm.key[1] == "protected",
                    before=False)
    commit = Async(live.commit)  # (or the committer thread's own commit fails first)
    hold.wait_arrived()
    assert hit, "the clone's file was not fdatasync'ed by the commit"
    whole_read = Async(lambda: live.read("src", 21 * EXT, 4096))
    part_read = Async(lambda: live.read("src", 22 * EXT + 512, 4096))
    got_whole = finish_read(whole_read, hold)
    got_part = part_read.result(10.0)
    commit.thread.join(10.0)
    wrong = [what for what, got, want in (("whole-extent write", got_whole, whole[:4096]),
                                          ("partial write", got_part, part)) if got != want]
    assert not wrong, ("reads started after these acknowledged writes returned other data "
                       f"(the clone's: {got_whole[:12]!r}, {got_part[:12]!r}): {wrong}")


class HeldEvent(threading.Event):
    """``Restore.ready`` whose first ``is_set`` by the reader thread waits
    until released: only the timing of the real call is chosen."""
    arrived = threading.Event()
    released = threading.Event()

    def is_set(self) -> bool:
        if threading.current_thread().name == READER and not HeldEvent.arrived.is_set():
            HeldEvent.arrived.set()
            HeldEvent.released.wait(30)
        return super().is_set()


def admin_commit_fails() -> None:
    """Fail the COMMIT of the admin command's transaction (as
    test_admin_rollback: SQLite's full-disk error), not group commits."""
    import sqlite3
    import traceback

    def full():
        if not any(f.name == "commit_now" for f in traceback.extract_stack()):
            raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)


def test_a_read_racing_a_failed_restore_start_reads_the_source(live):
    """A restore start whose COMMIT fails changes nothing (undo); its gate
    opens anyway (``finally: r.ready.set()``) and ``r.pending`` keeps the
    clone's delta map it was assigned before the COMMIT.  A host read that
    took ``fam.restore`` while the gate was closed and looks at ``ready``
    after that sees the gate open and the extent pending: the lock-free
    path reads the clone of a restore that never happened.  (The locked
    path asks ``fam.restore`` again under the lock and reads the source.)"""
    clone_data = pattern(b"clone-")
    live.fractured_clone(data=clone_data)
    old = pattern(b"old-", PENDING * EXT)
    live.write("src", old, 0)
    gated, go = threading.Event(), threading.Event()
    faults.arm("restore.gated", lambda: (gated.set(), go.wait(30)))
    begin = live.cmd_in_thread("restore", source="src", clone_name="c1")
    assert gated.wait(10), "the restore start never closed its gate"
    r = live.family("src").restore
    r.ready.__class__ = HeldEvent
    box: dict = {}
    reader = threading.Thread(name=READER, daemon=True,
                              target=lambda: box.setdefault("data",
                                                            live.read("src", 20 * EXT, 4096)))
    reader.start()
    assert HeldEvent.arrived.wait(10), "the read never looked at the gate"
    admin_commit_fails()
    go.set()
    with pytest.raises(Exception):
        begin.result(30.0)
    faults.disarm()
    assert live.family("src").restore is None and live.clone("c1").state == "fractured"
    assert r.ready.is_set() and r.pending.test(20), "not the state this test is about"
    HeldEvent.released.set()
    reader.join(10.0)
    assert box.get("data") == old[20 * EXT:20 * EXT + 4096], \
        "a read of a source whose restore start failed returned the clone's data"
    assert live.read("src", 20 * EXT, 4096) == old[20 * EXT:20 * EXT + 4096]
