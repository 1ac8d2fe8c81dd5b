"""LazyFS (tests/lazyfs.py) against a real FUSE mount: what is fsynced survives
a power cut, what is not is gone; and the lunclone daemon on it keeps its
flushed writes across SIGKILL + power cut."""
import errno
import fcntl
import os
import sqlite3
import sys

import pytest

from helpers import ROOT, fsync_path
from lazyfs import LazyFS, fallocate

sys.path.insert(0, os.path.join(ROOT, "daemon"))
from lunclone import volume  # noqa: E402

MiB = 1 << 20


def path(fs: LazyFS, *names: str) -> str:
    return os.path.join(fs.mountpoint, *names)


def write_file(p: str, data: bytes, sync: bool = True, dir_sync: bool = True) -> None:
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if dir_sync:
        fsync_path(os.path.dirname(p))


def read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def cut_and_remount(fs: LazyFS, tear: bool = False, seed: int | None = None) -> None:
    fs.power_cut(tear=tear, seed=seed)
    fs.mount()


def test_synced_data_survives_unsynced_is_gone(lazy):
    p = path(lazy, "f")
    write_file(p, b"a" * 10000)
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"b" * 100, 50)
    os.pwrite(fd, b"c" * 100, 20000)        # also grows the file
    assert os.pread(fd, 3, 50) == b"bbb"     # reads see unsynced data
    os.close(fd)
    cut_and_remount(lazy)
    assert read(p) == b"a" * 10000


def test_mount_is_unusable_after_a_cut(lazy):
    fd = os.open(path(lazy, "f"), os.O_RDWR | os.O_CREAT, 0o600)
    lazy.power_cut()
    with pytest.raises(OSError) as e:
        os.pwrite(fd, b"x", 0)
    assert e.value.errno in (errno.ENOTCONN, errno.EIO, errno.ENODEV)
    with pytest.raises(OSError):            # close's flush fails too: power is off
        os.close(fd)


def test_new_name_needs_a_directory_fsync(lazy):
    write_file(path(lazy, "kept"), b"k", sync=True, dir_sync=True)
    write_file(path(lazy, "lost"), b"l", sync=True, dir_sync=False)  # file fsync only
    os.mkdir(path(lazy, "d"))
    write_file(path(lazy, "d", "inner"), b"i")     # d itself never reached the disk
    cut_and_remount(lazy)
    assert sorted(os.listdir(lazy.mountpoint)) == ["kept"]


def test_name_without_data_fsync_is_an_empty_file(lazy):
    write_file(path(lazy, "f"), b"data", sync=False, dir_sync=True)
    cut_and_remount(lazy)
    assert read(path(lazy, "f")) == b""


def test_unlink_without_directory_fsync_is_undone(lazy):
    write_file(path(lazy, "a"), b"A")
    write_file(path(lazy, "b"), b"B")
    os.unlink(path(lazy, "a"))
    os.unlink(path(lazy, "b"))
    cut_and_remount(lazy)
    assert sorted(os.listdir(lazy.mountpoint)) == ["a", "b"]
    assert read(path(lazy, "a")) == b"A"
    os.unlink(path(lazy, "a"))
    fsync_path(lazy.mountpoint)
    cut_and_remount(lazy)
    assert os.listdir(lazy.mountpoint) == ["b"]


def test_an_unlinked_open_file_still_works(lazy):
    fd = os.open(path(lazy, "f"), os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink(path(lazy, "f"))
    os.pwrite(fd, b"still here", 0)
    os.fsync(fd)
    assert os.pread(fd, 10, 0) == b"still here"
    os.close(fd)
    assert os.listdir(lazy.mountpoint) == []


def test_rename(lazy):
    write_file(path(lazy, "old"), b"content")
    os.rename(path(lazy, "old"), path(lazy, "new"))
    cut_and_remount(lazy)
    assert os.listdir(lazy.mountpoint) == ["old"]
    os.rename(path(lazy, "old"), path(lazy, "new"))
    fsync_path(lazy.mountpoint)
    cut_and_remount(lazy)
    assert os.listdir(lazy.mountpoint) == ["new"]
    assert read(path(lazy, "new")) == b"content"


def test_rename_across_directories_is_durable_on_either_side(lazy):
    os.mkdir(path(lazy, "d1"))
    os.mkdir(path(lazy, "d2"))
    fsync_path(lazy.mountpoint)
    write_file(path(lazy, "d1", "f"), b"moved")
    os.rename(path(lazy, "d1", "f"), path(lazy, "d2", "f"))
    fsync_path(path(lazy, "d2"))
    cut_and_remount(lazy)
    assert (os.listdir(path(lazy, "d1")), os.listdir(path(lazy, "d2"))) == ([], ["f"])
    assert read(path(lazy, "d2", "f")) == b"moved"


def test_rename_over_an_existing_file(lazy):
    write_file(path(lazy, "db"), b"old")
    write_file(path(lazy, "db.tmp"), b"new", dir_sync=False)
    os.replace(path(lazy, "db.tmp"), path(lazy, "db"))
    assert read(path(lazy, "db")) == b"new"
    cut_and_remount(lazy)
    assert read(path(lazy, "db")) == b"old"


def test_truncate(lazy):
    p = path(lazy, "f")
    write_file(p, b"x" * 8192)
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 100)
    os.close(fd)
    cut_and_remount(lazy)
    assert read(p) == b"x" * 8192           # not fsynced: undone
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 100)
    os.ftruncate(fd, 8192)                   # shrink then grow: the tail is zeroes
    os.fsync(fd)
    os.close(fd)
    cut_and_remount(lazy)
    assert read(p) == b"x" * 100 + bytes(8092)


def test_punch_hole(lazy):
    p = path(lazy, "f")
    write_file(p, b"d" * MiB)
    fd = os.open(p, os.O_RDWR)
    volume.punch_hole(fd, 4096, 8192)
    assert os.pread(fd, 8192, 4096) == bytes(8192)
    os.close(fd)
    cut_and_remount(lazy)
    assert read(p) == b"d" * MiB             # not fsynced: the data is back
    fd = os.open(p, os.O_RDWR)
    volume.punch_hole(fd, 0, MiB)
    os.fdatasync(fd)
    os.close(fd)
    cut_and_remount(lazy)
    assert read(p) == bytes(MiB)
    assert os.stat(os.path.join(lazy.backing, "f")).st_blocks == 0  # a hole on the disk


def test_zero_range_and_keep_size(lazy):
    p = path(lazy, "f")
    write_file(p, b"z" * 16384)
    fd = os.open(p, os.O_RDWR)
    fallocate(fd, 0x10, 4096, 4096)                   # FALLOC_FL_ZERO_RANGE
    fallocate(fd, volume.FALLOC_FL_KEEP_SIZE, 16384, MiB)
    assert os.fstat(fd).st_size == 16384
    os.fsync(fd)
    os.close(fd)
    cut_and_remount(lazy)
    assert read(p) == b"z" * 4096 + bytes(4096) + b"z" * 8192


def test_seek_data_and_hole(lazy):
    """libfuse 2 has no lseek: the kernel answers, seeing data from 0 to the
    size.  data_ranges still covers every byte written, and a sparse 1 GiB
    file costs nothing to fsync."""
    p = path(lazy, "f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 30)
    os.pwrite(fd, b"q" * 4096, 512 * MiB)
    assert os.lseek(fd, 0, os.SEEK_DATA) <= 512 * MiB
    assert os.lseek(fd, 512 * MiB, os.SEEK_HOLE) >= 512 * MiB + 4096
    runs = list(volume.data_ranges(fd, 0, 1 << 30))
    assert any(a <= 512 * MiB and b >= 512 * MiB + 4096 for a, b in runs)
    with pytest.raises(OSError) as e:
        os.lseek(fd, 1 << 30, os.SEEK_DATA)
    assert e.value.errno == errno.ENXIO
    os.fsync(fd)
    os.close(fd)
    fsync_path(lazy.mountpoint)
    cut_and_remount(lazy)
    st = os.stat(os.path.join(lazy.backing, "f"))
    assert st.st_size == 1 << 30 and st.st_blocks * 512 <= 64 * 4096


def test_copy_range_between_volumes(lazy):
    """volume.copy_range (copy_file_range with its read/write fallback) on the mount."""
    src = os.open(path(lazy, "src"), os.O_RDWR | os.O_CREAT, 0o600)
    dst = os.open(path(lazy, "dst"), os.O_RDWR | os.O_CREAT, 0o600)
    data = os.urandom(3 * MiB)
    os.pwrite(src, data, MiB)
    os.ftruncate(src, 8 * MiB)
    os.ftruncate(dst, 8 * MiB)
    os.pwrite(dst, b"\xff" * MiB, 0)
    volume.copy_range(src, dst, 0, 8 * MiB)
    assert os.pread(dst, 8 * MiB, 0) == bytes(MiB) + data + bytes(4 * MiB)
    os.close(src)
    os.close(dst)


def test_flock(lazy):
    p = path(lazy, "lock")
    a = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    b = os.open(p, os.O_RDWR)
    fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(BlockingIOError):
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(a)
    fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(b)


def test_sqlite_wal_keeps_committed_loses_uncommitted(lazy):
    p = path(lazy, "db.sqlite")
    db = sqlite3.connect(p, isolation_level=None)
    assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t(x)")
    db.execute("INSERT INTO t VALUES ('committed')")
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES ('uncommitted')")
    db.execute("INSERT INTO t SELECT randomblob(4096) FROM t")
    cut_and_remount(lazy)
    del db
    db = sqlite3.connect(p, isolation_level=None)
    assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert db.execute("SELECT x FROM t").fetchall() == [("committed",)]
    db.close()


def test_fail_fsync_reports_eio_once_and_drops_the_data(lazy):
    p = path(lazy, "vol.img")
    write_file(p, b"o" * 8192)
    lazy.fail_fsync("*.img")
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"n" * 4096, 0)
    with pytest.raises(OSError) as e:
        os.fdatasync(fd)
    assert e.value.errno == errno.EIO
    os.fdatasync(fd)                          # reported once
    os.close(fd)
    assert read(p) == b"o" * 8192            # dropped from the live view too
    cut_and_remount(lazy)
    assert read(p) == b"o" * 8192


def test_fail_fsync_spares_other_files(lazy):
    write_file(path(lazy, "a.db"), b"x")
    lazy.fail_fsync("*.img", once=False)
    write_file(path(lazy, "a.db"), b"y")
    lazy.clear_faults()


def test_tear_keeps_whole_4k_pieces(lazy):
    p = path(lazy, "f")
    blocks = 64
    write_file(p, b"o" * 4096 * blocks)
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"n" * 4096 * blocks, 0)
    os.close(fd)
    cut_and_remount(lazy, tear=True, seed=7)
    got = read(p)
    pieces = {got[i:i + 4096] for i in range(0, len(got), 4096)}
    assert pieces == {b"o" * 4096, b"n" * 4096}   # some of each, never a mix


def test_remount_keeps_a_clean_unmount(lazy):
    write_file(path(lazy, "f"), b"x", sync=False, dir_sync=False)
    lazy.unmount()
    lazy.mount()
    assert read(path(lazy, "f")) == b"x"


def test_daemon_keeps_flushed_writes_across_a_power_cut(lazy, lazy_daemon):
    """The real daemon with its whole state directory on the lazy mount:
    SIGKILL + power cut keeps what the client flushed."""
    d = lazy_daemon
    d.start()
    d.cli("create", "vol", "--size", str(16 * MiB))
    h = d.connect("vol")
    flushed = os.urandom(MiB)
    h.pwrite(flushed, 0)
    h.flush()
    h.pwrite(b"\xee" * MiB, 4 * MiB)        # never flushed
    del h
    d.kill()
    lazy.power_cut()
    lazy.mount()
    d.start()
    h = d.connect("vol")
    assert h.get_size() == 16 * MiB
    assert h.pread(MiB, 0) == flushed
    del h
    assert d.stop() == 0, d.log()
