"""Review of 969638c (protected bits of writes into pending extents set in
memory, committed by the next commit that a flush waits for): interleavings
that break "a bit set in memory is committed" for code that still relies
on it.  Both failed before the fix (Committer._keep_sets_until_flush).
"""
from __future__ import annotations

import pytest

from live import EXT, fail_fdatasync_once, pattern


def test_a_clone_writeback_error_does_not_undo_acknowledged_source_writes(live, monkeypatch):
    """A write-back error on the restoring clone's file (it is fdatasync'ed
    by every commit after a copy on demand read it) reloads every map from
    the database.  A host write into a pending extent whose protected bit
    was only set in memory becomes pending and unprotected again: reads
    return the clone's data, and a flush that then succeeds does not bring
    the write back; the restore job copies the clone over it."""
    live.pending_restore(paused=True)
    whole = b"W" * EXT
    lock = live.engine.committer.commit_lock
    with lock:  # no commit until both writes are in
        live.write("src", whole, 21 * EXT)                   # whole: protected in memory
        live.write("src", b"P" * 4096, 22 * EXT + 512)       # partial: copy on demand reads c1
        hit = fail_fdatasync_once(monkeypatch, live.clone("c1").volume.fd)
    with pytest.raises(OSError):
        live.commit()                     # fdatasync of c1 fails: maps put back
    assert hit, "the clone's file was not fdatasync'ed by the commit"
    live.volume("src").flush()            # succeeds: the source itself is fine
    assert live.read("src", 21 * EXT, EXT) == whole, \
        "an acknowledged (and then flushed) write reads as the clone's data"
    # The clone (the restore's data source) failed its write-back: the
    # restore cannot finish on it until a restart, as its status says.
    live.cmd("restore_resume", source="src")
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: live.family("src").restore.error, what="the restore to pause")
    assert "write-back" in live.family("src").restore.error
    live.restart()
    live.cmd("restore_resume", source="src")
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: live.family("src").restore is None, what="restore done")
    assert live.read("src", 21 * EXT, EXT) == whole, "the restore copied the clone over it"


def test_another_volumes_writeback_error_does_not_undo_acknowledged_writes(live, monkeypatch):
    """Same root cause as review4-1, from an unrelated volume: a host flush
    of another source (with a clone, so its flush goes through the
    committer) fails its fdatasync; ``_writeback_failed`` puts *every*
    map back to the database, so this restore's protected bit, set in
    memory by an acknowledged write, is gone.  The next flush of src
    succeeds and the write reads as the clone's data."""
    live.pending_restore(paused=True)
    live.fractured_clone(source="other", clone="d1", data=pattern(b"other-"))
    whole = b"W" * EXT
    with live.engine.committer.commit_lock:
        live.write("src", whole, 21 * EXT)   # protected in memory only
        hit = fail_fdatasync_once(monkeypatch, live.volume("other").fd)
        with pytest.raises(OSError):
            live.volume("other").flush()
    assert hit
    live.volume("src").flush()
    assert live.read("src", 21 * EXT, EXT) == whole, \
        "an acknowledged (and then flushed) write reads as the clone's data"
