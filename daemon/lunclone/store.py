"""Where a volume's bytes live: one interface for local files and NBD exports.

A source volume is always a local sparse file; a clone is a local file or
an export on another storage system (``remote.NbdStore``).  The policy and
the jobs speak only this interface, so the restore rules do not care where
a clone lives.

Durability, the one difference that matters to the crash rules:
- a local store (``fd >= 0``) is made durable by the committer, which
  fdatasyncs every volume that data was copied into before it commits the
  cleared bits (``Committer.copied_into``): one fdatasync for many copies;
- a remote store cannot be fdatasync'ed from here, so ``copy_range`` into
  it ends with an NBD FLUSH on each connection its writes went out on, on
  that very connection (``remote.NbdStore.copy_from_file``), and a copy
  that returned is durable.  A failed flush, or a connection lost between
  the writes and their flush, fails the copy: no bit is cleared for data
  that may not be there.
"""
from __future__ import annotations

import os
from typing import Iterator, Protocol

from . import volume as vf


class Store(Protocol):
    fd: int  # a local file's descriptor (fast paths), or -1 for a remote store
    path: str | None
    size: int

    def start(self) -> None: ...
    def pread(self, buf, offset: int) -> None: ...
    def pwrite(self, buf, offset: int) -> None: ...
    def zero(self, offset: int, length: int, may_trim: bool = True) -> None: ...
    def flush(self) -> None: ...
    def extents(self, offset: int, count: int, one: bool) -> list[tuple[int, int, bool]]: ...
    def describe(self) -> dict | None: ...
    def close(self) -> None: ...


class FileStore:
    """A sparse file on this host."""

    def __init__(self, path: str):
        self.path = path
        self.fd = vf.open_rw(path)
        self.size = os.fstat(self.fd).st_size

    def start(self) -> None:
        pass

    def pread(self, buf, offset: int) -> None:
        vf.read_into(self.fd, buf, offset)

    def pwrite(self, buf, offset: int) -> None:
        vf.write_from(self.fd, buf, offset)

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None:
        """A hole reads back as zeroes; without ``may_trim`` the range stays
        allocated (the client asked for no hole)."""
        if may_trim:
            vf.punch_hole(self.fd, offset, length)
        else:
            vf.zero_range(self.fd, offset, length)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def extents(self, offset: int, count: int, one: bool) -> list[tuple[int, int, bool]]:
        return vf.extents(self.fd, offset, count, one)

    def data_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        return vf.data_ranges(self.fd, offset, end)

    def describe(self) -> dict | None:
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def is_local(store: Store) -> bool:
    return store.fd >= 0


def is_remote(store: Store) -> bool:
    """Is the store behind a network (a copy job overlaps its round trips)?
    Not one local file is not always remote: an undo's source
    (``undo.UndoSource``) is two local files, or an image and a remote clone."""
    return getattr(store, "remote", not is_local(store))


def start_writeback(store: Store, offset: int, length: int) -> None:
    """A local file: start writing back what was copied into the range
    (``volume.start_writeback``).  A remote store: nothing (its copy was
    flushed already)."""
    if is_local(store):
        vf.start_writeback(store.fd, offset, length)


def copy_range(src: Store, dst: Store, offset: int, length: int) -> int:
    """Make dst[offset:offset+length] equal src's; return the bytes covered.

    Local to local uses copy_file_range and punches holes; to or from a
    remote store the transfer is pipelined by that store, and a remote
    destination is flushed before this returns (see the module docstring).
    """
    if is_local(src) and is_local(dst):
        vf.copy_range(src.fd, dst.fd, offset, length)
    elif is_local(dst):
        src.copy_into_file(dst, offset, length)
    elif is_local(src):
        dst.copy_from_file(src, offset, length)  # ends with its own flush
    else:
        raise ValueError("a copy between two remote stores is not supported")
    return length
