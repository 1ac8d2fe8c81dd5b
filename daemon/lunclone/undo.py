"""The undo image of a restore: the source's data from just before the
restore, kept only where the restore overwrites it.

At the start of a protected restore the source equals the clone except in
the pending extents (the clone's delta map).  The clone is never written
while the restore runs.  So the volume as it was just before the restore
is: the source's old data in the pending extents, and the clone's data
everywhere else.  Only the old data of the pending extents is kept, in a
sparse file ``STATE/undo/<source>.img`` the size of the source, at the
same offsets, and only once something is about to overwrite it.

The capture rule (``policy.Family.capture``, crash-consistency rule 5 in
docs/DESIGN.md): before any pending extent of the source is overwritten
(by the job, by a copy on demand, or by a host write covering it whole),
its old data is copied here and fdatasynced, and its bit in the captured
map is committed; only then is the source's extent written.  So after a
crash an extent is either captured (its old data is here, durable) or
still holds its old data in the source (nothing overwrote it).

Where and why: in the state directory, beside the volumes, even for a
remote clone: the old data is the *source's*, which is local, and
``copy_file_range`` within one filesystem may share blocks (reflink).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from . import volume as vf
from .bitmap import Bitmap
from .metadata import CAPTURED, JobRecord
from .store import FileStore, Store, copy_range, is_local

UNDO_DIR = "undo"


def path(state_dir: str, source: str) -> str:
    return os.path.join(state_dir, UNDO_DIR, f"{source}.img")


def open_or_create(state_dir: str, source: str, size: int) -> FileStore:
    """The source's undo image file, made (durably, with its name) if there
    is none.  An existing one may still hold the last restore's undo point:
    it is only emptied (``empty``) once the new start has committed."""
    p = path(state_dir, source)
    if not os.path.exists(p):
        vf.make_dirs(os.path.dirname(p), 0o700)
        vf.create_sparse(p, size)
    return FileStore(p)


def open_existing(state_dir: str, source: str) -> FileStore | None:
    p = path(state_dir, source)
    return FileStore(p) if os.path.exists(p) else None


def empty(store: FileStore) -> None:
    """Free the image's blocks: nothing in it is trusted any more (the new
    restore's captured map is empty), so no ordering is needed."""
    vf.punch_hole(store.fd, 0, os.fstat(store.fd).st_size)


def remove(state_dir: str, source: str) -> None:
    """Remove the undo image file (durably), if there is one."""
    p = path(state_dir, source)
    if os.path.exists(p):
        vf.remove(p)


def close(committer, store: FileStore) -> None:
    """Close an undo image; its fd number may be reused (``forget_fd``)."""
    with committer.commit_lock, committer.maps_lock:
        committer.forget_fd(store.fd)
        store.close()  # fd -1 from now on: never closed twice


def forget_point(committer, r, job: JobRecord | None, tx) -> bool:
    """In ``tx``: the undo point of finished restore ``r`` of ``job.source``
    goes (its captured map and the job's flag); once committed its image
    is closed (``tx.then`` runs under commit_lock and maps_lock, which
    ``forget_fd`` wants).  ``job`` is read before the transaction (the
    metadata's lock is held during it).  The caller removes the file after
    the transaction (``remove``).  True if there was a point."""
    if job is None or r is None or r.captured is None:
        return False
    tx.delete_bitmap(job.source, CAPTURED)
    tx.put_job(dataclasses.replace(job, undo=False))
    store = r.undo_store

    def gone() -> None:
        r.captured = r.undo_store = None
        if store is not None:
            committer.forget_fd(store.fd)
            store.close()
    tx.then(gone)
    return True


def stored_point(committer, source: str | None = None,
                 clone: str | None = None) -> JobRecord | None:
    """The job row of a finished restore that keeps its undo point, of
    ``source`` and/or from ``clone``: how a point is found that is not in
    memory (its clone was not loaded: its file, or its source's, was
    missing at start-up).  Read outside any transaction."""
    return next((j for j in committer.md.jobs() if j.undo and j.state == "done"
                 and source in (None, j.source) and clone in (None, j.clone)), None)


def forget_stored_point(job: JobRecord, tx) -> None:
    """In ``tx``: ``stored_point``'s point goes (nothing of it is in
    memory); the caller removes the image after the transaction."""
    tx.delete_bitmap(job.source, CAPTURED)
    tx.put_job(dataclasses.replace(job, undo=False))


def job_of(committer, source: str) -> JobRecord | None:
    """The source's job row (read outside any transaction)."""
    return next((j for j in committer.md.jobs() if j.source == source), None)


def forget(committer, state_dir: str, source: str, r) -> None:
    """Drop the undo point of finished restore ``r`` of ``source``: one
    transaction, then the image file."""
    job = job_of(committer, source)
    with committer.transaction() as tx:
        dropped = forget_point(committer, r, job, tx)
    if dropped:
        remove(state_dir, source)


class UndoSource:
    """Where ``restore undo`` reads an extent's pre-restore data: the undo
    image where the extent is captured, the clone everywhere else.  Both
    are read-only meanwhile (the clone is not written while it holds the
    undo point, and an undo captures nothing), so no read of them needs a
    lock, and what is copied from them is durable already.

    Not one local file (``fd`` -1): ``store.copy_range`` hands a copy to
    ``copy_into_file``, which copies each part with ``copy_range``
    (copy_file_range where both ends are local)."""

    fd = -1

    def __init__(self, captured: Bitmap, image: FileStore, clone: Store, shift: int):
        self.captured, self.image, self.clone, self.shift = captured, image, clone, shift
        self.remote = not is_local(clone)  # the job's window: see ``store.is_remote``

    def parts(self, offset: int, length: int) -> Iterator[tuple[Store, int, int]]:
        """(store, offset, length) runs covering the range, in order."""
        pos, end, shift, test = offset, offset + length, self.shift, self.captured.test
        while pos < end:
            from_image = test(pos >> shift)
            stop = min(end, ((pos >> shift) + 1) << shift)
            while stop < end and test(stop >> shift) == from_image:
                stop = min(end, ((stop >> shift) + 1) << shift)
            yield (self.image if from_image else self.clone), pos, stop - pos
            pos = stop

    def pread(self, buf, offset: int) -> None:
        view = memoryview(buf)
        for store, start, n in self.parts(offset, len(buf)):
            store.pread(view[start - offset:start - offset + n], start)

    def copy_into_file(self, dst: FileStore, offset: int, length: int) -> None:
        for store, start, n in self.parts(offset, length):
            copy_range(store, dst, start, n)

    def flush(self) -> None:
        pass

    def describe(self) -> dict | None:
        return None
