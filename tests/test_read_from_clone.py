"""Reads of pending extents taken from the clone (policy.Family.pread):
the read decides "pending, read the clone" under the maps lock, then reads
the clone without the lock.  Each test holds such a read between its
decision and its read of the clone while the restore copies everything
else, and checks that the restore does not finish under it (after that the
clone may be written or deleted: no serial order lets a read of the source
return a write made to another volume, or fail because a volume it never
named was deleted), and that the read returns the restored data.
"""
from __future__ import annotations

import time

from lunclone import volume as vf
from live import EXT, PENDING, MiB, Async, Hold, pattern

SIZE = 4 * MiB
READ_AT = 20 * EXT  # pending in ``pending_restore``, reached late by its job


def _held_clone_read(live, monkeypatch) -> tuple[bytes, Async, Hold]:
    """A protected restore of src from c1 (slow); a host read of a pending
    extent held after it chose the clone, just before it reads the clone."""
    clone_data = live.pending_restore()
    clone_fd = live.clone("c1").volume.fd
    hold = Hold(monkeypatch, vf, "read_into",
                lambda fd, buf, off: fd == clone_fd and off == READ_AT)
    reader = Async(lambda: live.read("src", READ_AT, 4096))
    hold.wait_arrived()  # decided: extent 20 pending, read from c1
    copy_the_rest_while_held(live)
    return clone_data[READ_AT:READ_AT + 4096], reader, hold


def copy_the_rest_while_held(live) -> None:
    """Unthrottle the restore: it copies every extent, then must wait for
    the read of its clone before it finishes."""
    live.cmd("restore_rate", source="src", limit="0")
    r = live.family("src").restore
    live.wait(lambda: not r.pending.any(), what="every extent copied")
    time.sleep(0.3)  # the job tries to finish meanwhile
    assert live.family("src").restore is r, "the restore finished under a read of its clone"


def release_and_finish(live, reader: Async, hold: Hold, expected: bytes) -> None:
    hold.release()
    got = reader.result()
    assert got == expected
    live.wait(lambda: live.family("src").restore is None, what="restore done")


def test_source_read_of_pending_extent_never_returns_a_later_clone_write(live, monkeypatch):
    """The restore finishes while the read is held; the clone is fractured
    again and the host writes to the clone's export.  The source never
    held that data: the read must return the restored data."""
    expected, reader, hold = _held_clone_read(live, monkeypatch)
    release_and_finish(live, reader, hold, expected)
    assert live.clone("c1").state == "fractured"
    live.write("c1", b"X" * 4096, READ_AT)  # a write to the clone, not to src
    assert live.read("src", READ_AT, 4096) == expected


def test_source_read_of_pending_extent_survives_clone_delete(live, monkeypatch):
    """The restore finishes while the read is held; the clone is deleted
    (its file closed) and another volume is created.  The read of the
    source must neither fail nor return another volume's data."""
    expected, reader, hold = _held_clone_read(live, monkeypatch)
    release_and_finish(live, reader, hold, expected)
    live.cmd("clone_delete", name="c1")
    live.cmd("create", name="other", size=SIZE)  # may take the freed descriptor
    live.write("other", pattern(b"Z"), 0)
    assert live.read("src", READ_AT, 4096) == expected


def test_source_read_of_pending_extent_survives_remote_clone_delete(live, monkeypatch, workdir):
    """The same with a clone on another system: the read chose the remote
    clone, the restore finishes and the clone is deleted (its connections
    closed).  The read of the source must still return the restored data."""
    import os
    from lunclone import remote
    from servers import NbdkitFile
    srv = NbdkitFile(os.path.join(workdir, "remote.img"), os.path.join(workdir, "remote.sock"),
                     size=SIZE).start()
    try:
        clone_data = pattern(b"clone-")
        live.cmd("create", name="src", size=SIZE)
        live.write("src", clone_data, 0)
        live.cmd("clone_create", source="src", name="c1", remote=srv.uri)
        live.wait_clone("c1", "synchronized")
        live.cmd("clone_fracture", name="c1")
        live.write("src", pattern(b"old-", PENDING * EXT), 0)
        live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
        hold = Hold(monkeypatch, remote.NbdStore, "pread",
                    lambda store, buf, off: off == READ_AT and len(buf) == 4096)
        reader = Async(lambda: live.read("src", READ_AT, 4096))
        hold.wait_arrived()  # decided: extent 20 pending, read from the remote c1
        copy_the_rest_while_held(live)
        expected = clone_data[READ_AT:READ_AT + 4096]
        release_and_finish(live, reader, hold, expected)  # EIO if its store was closed
        live.cmd("clone_delete", name="c1")
        assert live.read("src", READ_AT, 4096) == expected
    finally:
        srv.stop()
