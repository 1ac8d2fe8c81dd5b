"""A write-back error (fdatasync fails) is never retried as if harmless.

Linux reports a write-back error once and drops the data it could not
write; a retry of fdatasync then "succeeds".  The daemon's state directory
lives on the lazy filesystem (``lazyfs``), which fails one fdatasync of
the source's file with EIO and drops that file's unsynced data, as the
kernel does.  What the restore copied before that is gone from the disk:
its pending bits must stay set, the volume is marked failed (status,
metrics, flushes fail) until the daemon is restarted, and after the
restart the restore copies those extents again.
"""
import errno
import os

import pytest

from helpers import SMALL as SIZE, wait_for


def restore_of(d, name="src"):
    return d.json("status", name)["restore"]


def test_failed_fdatasync_keeps_bits_and_fails_the_volume(lazy, lazy_daemon):
    d = lazy_daemon
    d.start()
    d.cli("create", "src", "--size", str(SIZE))
    h = d.connect("src")
    clone_data = os.urandom(SIZE)
    h.pwrite(clone_data, 0)
    h.flush()
    d.cli("clone", "create", "src", "c1")
    wait_for(lambda: d.json("status", "src")["clones"][0]["state"] == "synchronized", 60)
    d.cli("clone", "fracture", "c1")
    h.pwrite(b"\x5a" * SIZE, 0)
    h.flush()
    d.cli("restore", "src", "--from", "c1", "--rate", "256K")
    lazy.fail_fsync("volumes/src.img", errno=errno.EIO, once=True)
    p = d.cli("restore", "rate", "src", "0", check=False)
    if p.returncode:  # its transaction met the failed write-back first: it says so
        assert "write-back" in p.stderr
        d.cli("restore", "rate", "src", "0")
    wait_for(lambda: restore_of(d)["state"] in ("done", "paused"), 60, what="restore stops")
    st = d.json("status", "src")
    assert restore_of(d)["state"] == "paused", "the restore finished over lost data"
    assert "write-back" in (st["error"] or "")
    with pytest.raises(Exception):
        h.flush()  # the host is told, and keeps being told
    assert "lunclone_volume_writeback_failed{volume=\"src\"} 1" in d.cli("metrics").stdout
    del h
    d.stop()
    d.start()
    if restore_of(d)["state"] == "paused":
        d.cli("restore", "resume", "src")
    wait_for(lambda: restore_of(d)["state"] == "done", 60, what="restore done")
    h = d.connect("src")
    assert h.pread(SIZE, 0) == clone_data
    del h
    assert d.stop() == 0, d.log()
