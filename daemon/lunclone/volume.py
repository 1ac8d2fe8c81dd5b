"""Volume files: sparse files on the local filesystem.

Everything here is a thin, synchronous wrapper over a system call; the
policy (which extents to copy, which maps to update) lives in ``iopath``
and ``jobs``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Iterator

from .errors import no_space

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 0x2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def create_sparse(path: str, size: int) -> None:
    """Create ``path`` as a sparse file of ``size`` bytes; fail if it exists."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        remove(path)
        raise
    os.close(fd)
    fsync_dir(os.path.dirname(path))


def remove(path: str, missing_ok: bool = False) -> None:
    """Unlink ``path`` and fsync its directory: a power cut after this
    returns cannot bring the file back."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
    fsync_dir(os.path.dirname(path))


def make_dirs(path: str, mode: int = 0o777) -> None:
    """``os.makedirs(path, mode, exist_ok=True)`` whose new directories
    survive a power cut: the parent of each directory made is fsynced."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    make_dirs(os.path.dirname(path))
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    """Make the names in directory ``path`` (made, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_rw(path: str, readonly: bool = False) -> int:
    return os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)


def read_into(fd: int, buf, offset: int) -> None:
    """Fill ``buf`` from ``offset``; a short read means the file shrank."""
    n = os.preadv(fd, [buf], offset)
    if n != len(buf):
        _fill_short_read(fd, buf, offset, n)


def _fill_short_read(fd: int, buf, offset: int, done: int) -> None:
    view = memoryview(buf)
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "short read: volume file is shorter than the volume")
        done += n


def write_from(fd: int, buf, offset: int) -> None:
    """Write all of ``buf`` at ``offset``."""
    n = os.pwrite(fd, buf, offset)
    if n != len(buf):
        view = memoryview(buf)
        while n < len(view):
            n += os.pwrite(fd, view[n:], offset + n)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range; it reads back as zeroes."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back the dirty pages of a range, without waiting for
    it: a copy's data then goes to disk while the next copy runs, and the
    fdatasync that must come before its bits' clear commits has little
    left to do.  Only a hint: durability still comes from that fdatasync
    alone.  Its result is ignored: without SYNC_FILE_RANGE_WAIT_* it does
    not consume a write-back error (the fdatasync still reports it), and
    where the call is missing nothing is lost but time."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Zero a range and keep it allocated (NBD WRITE_ZEROES without MAY_TRIM);
    where the filesystem cannot, write zeroes."""
    if _libc.fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, f"fallocate(ZERO_RANGE): {os.strerror(err)}")
    chunk = bytes(min(length, 1 << 20))
    for pos in range(offset, offset + length, len(chunk)):
        write_from(fd, memoryview(chunk)[:min(len(chunk), offset + length - pos)], pos)


def data_ranges(fd: int, offset: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield (start, stop) of the allocated ranges within [offset, end)."""
    pos = offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if start >= end:
            return
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        yield start, stop
        pos = stop


def extents(fd: int, offset: int, count: int, one: bool) -> list[tuple[int, int, bool]]:
    """(offset, length, is_hole) runs covering [offset, offset+count)."""
    end = offset + count
    runs: list[tuple[int, int, bool]] = []
    pos = offset
    for start, stop in data_ranges(fd, offset, end):
        if start > pos:
            runs.append((pos, start - pos, True))
        runs.append((start, stop - start, False))
        pos = stop
        if one:
            return runs[:1]
    if pos < end:
        runs.append((pos, end - pos, True))
    return runs[:1] if one else runs


def no_space_guard(exc: OSError) -> OSError:
    """ENOSPC and EDQUOT become NoSpace for the control server."""
    return no_space(exc, "the volume") or exc


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    """Make dst[offset:offset+length] equal src's: copy data, punch holes.

    Returns the bytes of data copied (holes cost nothing).
    """
    end = offset + length
    pos = offset
    copied = 0
    for start, stop in data_ranges(src_fd, offset, end):
        if start > pos:
            punch_hole(dst_fd, pos, start - pos)
        copied += _copy_data(src_fd, dst_fd, start, stop - start)
        pos = stop
    if pos < end:
        punch_hole(dst_fd, pos, end - pos)
    return copied


_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
COPY_CHUNK = 1 << 20


def _copy_data(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    """copy_file_range, or read/write where the two files cannot use it
    (another filesystem, FUSE): the same bytes either way."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
        except OSError as e:
            if e.errno not in _NO_COPY_FILE_RANGE:
                raise
            return done + _copy_by_read(src_fd, dst_fd, offset + done, length - done)
        if n == 0:
            raise OSError(errno.EIO, "copy_file_range: unexpected end of source")
        done += n
    return done


def _copy_by_read(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        data = os.pread(src_fd, min(COPY_CHUNK, length - done), offset + done)
        if not data:
            raise OSError(errno.EIO, "read: unexpected end of source")
        write_from(dst_fd, data, offset + done)
        done += len(data)
    return done
