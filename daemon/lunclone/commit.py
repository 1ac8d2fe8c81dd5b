"""Group commit of map changes: crash-consistency rules 1, 2 and 4.

Invariants (docs/DESIGN.md, "Crash consistency"):

- A bit set in an in-memory map is committed.  A request that needs a bit
  set calls ``request`` (holding ``maps_lock``) and, if the bit is not set yet,
  waits on the returned Batch; the bit becomes visible in memory only once
  its commit is durable, so a second writer to the same extent waits for
  the same commit instead of passing an uncommitted bit (dm-era's bug).
- A bit may be cleared in memory at once ("lazily"); the clear reaches the
  metadata with the next commit.  Whoever clears a bit after copying data
  into a volume calls ``copied_into(fd)`` in the same critical section, and
  every commit fdatasyncs those volumes *before* writing the pages, so a
  cleared bit never claims data that is not durable (rule 2).
- Every commit runs under ``commit_lock``, so pages never go to the
  database out of order; the writing itself happens without ``maps_lock``.
- Requests gather while a commit is in progress and share the next one;
  only the waiters of a finished batch are woken (rule 4).
- A commit that only sets requested bits needs no fdatasync: while lazy
  clears wait for one (``copied_into``), the committer commits requested
  bits alone (unless one stops a copy whose data may not be durable yet:
  ``SETS_STOP_COPIES``), each into its page *as stored* (never the in-memory page,
  which holds clears whose data may not be durable yet), and makes the
  full commit (fdatasync, then every dirty page) once per
  ``LAZY_INTERVAL``, or at once when a flush waits for it.  A host write
  waiting for its map bit then waits for one SQLite commit, not for the
  write-back of what jobs and copies on demand wrote meanwhile.
- An fdatasync that fails is never retried as if harmless: Linux reports a
  write-back error once, and the data it lost is gone, so a retry would
  "succeed" and commit clears for lost data (PostgreSQL's fsync problem).
  The volume is marked failed (``failed_fds``, shown in status), every map
  is put back to what the database holds (each clear not yet committed is
  undone, so those extents are copied again), and from then on nothing
  copies into that volume, no clear depends on it, and its flushes fail,
  until the daemon is restarted.

The locks (one of each in the daemon; this module owns both):

- ``maps_lock`` (an RLock) guards every in-memory map and every state a
  host request reads to decide its rules: bitmaps, ``Family`` (clones,
  restore, in-flight copies, writers), clone states, a volume's connection
  count.  Whoever holds it only looks and changes memory: it never waits
  on a Batch, an Event, a write generation or a copy.  Waiting is done
  after releasing it, then the decision is made again.  The only I/O under
  it is an admin ``transaction`` (fdatasync and SQLite, below), the reload
  of maps after a failed write-back, and ``restore resume`` serving an
  unserved source again (its files opened and maps loaded before any
  client can open it): host requests stall for those, which is why admin
  commands do their slow scans before the transaction.
- ``commit_lock`` orders commits.  Lock order: ``commit_lock`` before
  ``maps_lock``, never the other way.  (A family's map-load lock,
  ``Families.load_maps``, comes before both: it is never taken holding
  either, nor the metadata's lock.)  ``transaction()`` holds both for the
  whole SQLite transaction, so an admin change and the in-memory maps it
  reads cannot move apart; a host request never takes ``commit_lock``.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from typing import Iterator

from . import faults
from .bitmap import PAGE_BITS, Bitmap
from .errors import MetadataError, no_space
from .metadata import PROTECTED, Metadata, Transaction

log = logging.getLogger("lunclone.commit")

LAZY_INTERVAL = 1.0
# Maps whose set bit stops a copy, as a clear does: a protected extent is
# never copied again, so its bit must follow the data the copy before it
# put there (rule 2) and goes out in a commit of requested bits alone only
# if that data is durable already (``request(copy_durable=True)``; review8:
# an extent pending and protected after a power cut, holding pre-restore
# data).  A delta bit set only adds a copy.
SETS_STOP_COPIES = (PROTECTED,)


class Batch:
    """The bits one commit sets; waiters block on ``wait``."""

    __slots__ = ("bits", "event", "error", "until_flush", "stops_copies")

    def __init__(self) -> None:
        self.bits: list[tuple[Bitmap, int]] = []
        # Bits set by ``set_until_flush`` that this commit makes durable,
        # with the volume whose data each one vouches for.
        self.until_flush: list[tuple[Bitmap, int, int]] = []
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.stops_copies = False  # a bit that needs the full commit's fdatasync

    def wait(self) -> None:
        self.event.wait()
        if self.error is not None:
            raise commit_error(self.error)


def _writeback_message(exc: OSError) -> str:
    return (f"write-back to the volume file failed ({exc.strerror}): data written since "
            "its last flush may be lost; restart the daemon to copy again what the maps "
            "still need")


def commit_error(exc: BaseException) -> Exception:
    """What a request whose commit failed raises: ENOSPC for a full disk."""
    return no_space(exc, "data or metadata") or MetadataError(f"metadata commit failed: {exc}")


class _SyncGroup:
    """Shared fdatasyncs of one file (``Committer.sync_shared``): how many
    started, the last one done, whether one runs now, which failed."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started = self.done = 0
        self.running = False
        self.errors: dict[int, BaseException] = {}  # by number (a failed file fails for good)


class Committer:
    def __init__(self, md: Metadata, maps_lock: threading.RLock | None = None):
        self.md = md
        self.maps_lock = maps_lock if maps_lock is not None else threading.RLock()
        self.commit_lock = threading.Lock()
        self.maps: set[Bitmap] = set()
        self._open = Batch()  # requested bits (``request``)
        self._open_flush = Batch()  # bits set until a flush (``set_until_flush``)
        self._requested: dict[tuple[int, int], Batch] = {}
        # The batches a commit is writing now (a commit of requested bits
        # alone leaves the flush batch open).
        self._committing: Batch | None = None
        self._committing_flush: Batch | None = None
        self._flush_wanted = False  # a flush waits for the next full commit
        self._last_full = time.monotonic()
        self._sync_fds: set[int] = set()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.failed_fds: dict[int, str] = {}  # volumes whose write-back failed
        self._reloaded: set[int] = set()  # ... whose maps were put back (once each)
        self._sync_locks: dict[int, threading.Lock] = {}  # one fdatasync of a file at a time
        self._sync_groups: dict[int, _SyncGroup] = {}  # ``sync_shared``'s, per file
        # Full commits (and admin transactions) started, and the last of them
        # whose fdatasyncs are done: data copied before ``copied_into(fd)``
        # under epoch e is durable once ``synced_epoch > e``.
        self.epoch = 0
        self.synced_epoch = 0

    # -- called with ``maps_lock`` held ------------------------------------------
    def register(self, bm: Bitmap) -> None:
        self.maps.add(bm)

    def unregister(self, bm: Bitmap) -> None:
        self.maps.discard(bm)

    def request(self, bm: Bitmap, i: int, copy_durable: bool = False) -> Batch | None:
        """Ask for bit ``i`` of ``bm`` to be set; None if it is already durable.

        A bit of a map in SETS_STOP_COPIES waits for the full commit (whose
        fdatasync makes a copy into the extent durable first) unless the
        caller knows ``copy_durable``: no copy into the extent waits for
        an fdatasync."""
        if bm.test(i):
            return None
        key = (id(bm), i)
        batch = self._requested.get(key)
        if batch is None:
            batch = self._open
            batch.bits.append((bm, i))
            self._requested[key] = batch
            self._wake.set()
        if not copy_durable and bm.key is not None and bm.key[1] in SETS_STOP_COPIES \
                and batch is self._open:
            batch.stops_copies = True
        return batch

    def set_until_flush(self, bm: Bitmap, i: int, fd: int) -> None:
        """Set bit ``i`` of ``bm`` in memory now, vouching for data written
        to volume ``fd``; it goes out with the next commit (``fd`` is
        fdatasync'ed first), and a host flush waits for that commit
        (``commit_for_flush``).

        Only for a bit whose absence after a crash is harmless: the
        protected bit of a host write into an extent whose pending bit is
        committed (a crash before the commit copies the extent again, which
        undoes only writes never flushed: docs/DESIGN.md, rule 3)."""
        bm.set(i)
        self._sync_fds.add(fd)
        self._open_flush.until_flush.append((bm, i, fd))

    def commit_for_flush(self) -> None:
        """Wait until the bits set by ``set_until_flush`` so far are durable:
        for the open batch if it carries some (a failed commit hands its own
        on to it), else for the commit in progress if that one does."""
        with self.maps_lock:
            batch = next((b for b in (self._open_flush, self._committing_flush)
                          if b is not None and b.until_flush), None)
            if batch is not None:
                self._flush_wanted = True
        if batch is not None:
            self._wake.set()
            batch.wait()

    def has_requests(self, bm: Bitmap) -> bool:
        """Are bits of ``bm`` requested but not committed yet?"""
        return any(k[0] == id(bm) for k in self._requested)

    def copied_into(self, fd: int) -> None:
        """Data was copied into ``fd``: fdatasync it before the next commit."""
        self._sync_fds.add(fd)

    def forget_fd(self, fd: int) -> None:
        """A volume is closed (under ``commit_lock`` and ``maps_lock``): its fd
        number may be reused by another file."""
        self._sync_fds.discard(fd)
        self.failed_fds.pop(fd, None)
        self._reloaded.discard(fd)
        self._sync_groups.pop(fd, None)

    def check_writable(self, fd: int) -> None:
        """Refuse to copy into (or vouch for) a volume whose write-back failed."""
        msg = self.failed_fds.get(fd)
        if msg is not None:
            raise OSError(errno.EIO, msg)

    def sync_volume(self, fd: int) -> None:
        """fdatasync a volume file; a failure marks it failed (see above).

        One fdatasync of a file at a time, from check to mark (a lock per
        descriptor): Linux reports a write-back error to one fdatasync of
        the descriptor only, so a commit, a host flush or a copy thread
        whose fdatasync ran beside the one that was told would return 0
        and vouch for lost data.  Serialized, the second one finds the
        file marked failed.  The maps are put back after the lock is
        released (``maps_lock`` may be held by a caller waiting for it)."""
        with self._sync_locks.setdefault(fd, threading.Lock()):
            self.check_writable(fd)
            try:
                os.fdatasync(fd)
                return
            except OSError as e:
                error = e
                self.failed_fds.setdefault(fd, _writeback_message(e))
        self._writeback_failed(fd, error)
        raise OSError(error.errno, self.failed_fds.get(fd, str(error))) from error

    def sync_shared(self, fd: int) -> None:
        """``sync_volume`` for a caller whose writes to ``fd`` have returned:
        any fdatasync that starts after this call covers them, so callers
        that come together share one, as their bits share one commit
        (captures of host writes: one each would queue them behind each
        other's fdatasync).  Every caller of a failed one gets its error."""
        group = self._sync_groups.setdefault(fd, _SyncGroup())
        with group.cond:
            wanted = group.started + 1  # one in progress may have begun before our writes
            while group.done < wanted:
                if group.running:
                    group.cond.wait()
                    continue
                group.running = True
                group.started += 1
                mine = group.started
                group.cond.release()
                try:
                    self.sync_volume(fd)
                except BaseException as e:
                    group.errors[mine] = e
                finally:
                    group.cond.acquire()
                    group.running = False
                    group.done = mine
                    group.cond.notify_all()
            error = group.errors.get(wanted)
        if isinstance(error, OSError):  # (one object per caller: tracebacks differ)
            raise OSError(error.errno, error.strerror) from error
        if error is not None:
            raise error

    def _writeback_failed(self, fd: int, exc: OSError) -> None:
        with self.maps_lock:
            if fd in self._reloaded:
                return
            self._reloaded.add(fd)
            log.error("fdatasync of fd %d failed: %s; maps put back to the database", fd, exc)
            kept = self._sets_to_keep(fd)
            for bm in self.maps:
                if bm.key is not None and bm.loaded:  # an unloaded one is the stored one
                    loaded = self.md.load_bitmap(*bm.key, bm.nbits)
                    for i in kept.get(bm, ()):
                        loaded.set_committed(i)
                    # In place, page by page: reads that look without the
                    # lock never see a kept bit cleared.
                    bm.assign(loaded)
                    for i in kept.get(bm, ()):
                        bm.set(i)  # (its page goes out with the next commit)
            # Every clear that counted on it is undone, and none counts on it
            # from now on (``Family._on_failed_volume``): no commit syncs it.
            self._sync_fds.discard(fd)

    def _sets_to_keep(self, failed_fd: int) -> dict[Bitmap, list[int]]:
        """Bits set by ``set_until_flush`` are not in the database yet, but
        they stand for acknowledged writes: the reload keeps them (their
        commit is still to come), unless their data was on the volume whose
        write-back failed (its flushes fail from now on)."""
        kept: dict[Bitmap, list[int]] = {}
        batches = [self._open_flush] + ([self._committing_flush]
                                        if self._committing_flush else [])
        for batch in batches:
            for bm, i, fd in batch.until_flush:
                if fd != failed_fd and fd not in self.failed_fds and bm in self.maps:
                    kept.setdefault(bm, []).append(i)
        return kept

    # -- the committer thread ---------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lunclone-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)
        self.commit_now()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(LAZY_INTERVAL)
            self._wake.clear()
            try:
                self.commit_now(full=self._full_due())
            except Exception:
                log.exception("metadata commit failed")

    def _full_due(self) -> bool:
        """Is a full commit due, or would it cost no more than requested
        bits alone (no fdatasync waits)?  See the module docstring.  A
        requested bit that stops a copy is ``_commit_requests``'s to see,
        under the locks its commit holds."""
        with self.maps_lock:
            return (not self._open.bits or not self._sync_fds or self._flush_wanted
                    or time.monotonic() - self._last_full >= LAZY_INTERVAL)

    def commit_now(self, full: bool = True) -> None:
        """Commit the open batch and every lazily changed page; not ``full``:
        only the requested bits (``_commit_requests``)."""
        if not full and self._commit_requests():
            return
        with self.commit_lock:
            with self.maps_lock:
                batch, self._open = self._open, Batch()
                flushed, self._open_flush = self._open_flush, Batch()
                self._flush_wanted = False
                pages = self._compose(batch)
                fds, epoch = self._take_sync_fds()
                self._committing, self._committing_flush = batch, flushed
            if not pages and not fds and not batch.bits:
                with self.maps_lock:  # e.g. its map was deleted meanwhile
                    self._committing = self._committing_flush = None
                self.synced_epoch = epoch
                self._last_full = time.monotonic()
                batch.event.set()
                flushed.event.set()
                return
            try:
                if faults.armed is not None:
                    faults.hit("commit.before_fdatasync")
                self._sync_all(fds, epoch)
                if faults.armed is not None:
                    faults.hit("commit.after_fdatasync")
                with self.md.transaction() as tx:
                    for (owner, kind, p), data in pages.items():
                        tx.save_page(owner, kind, p, data)
            except BaseException as e:
                self._failed(batch, flushed, pages, fds, e)
                raise
            self._committed(batch)
            self._last_full = time.monotonic()
            flushed.event.set()

    def _commit_requests(self) -> bool:
        """Commit the requested bits alone, each set into its page as the
        database holds it: no lazy change rides along, so no volume needs an
        fdatasync first (rule 1 needs none: the data is written after).
        False, with nothing done, if a requested bit stops a copy whose data
        may not be durable yet: the full commit must go instead.  Checked
        here, under the locks of the commit, not where the caller chose
        (``_full_due``): a host write may request such a bit in between
        (review11)."""
        with self.commit_lock:
            with self.maps_lock:
                if self._open.stops_copies:
                    return False
                batch, self._open = self._open, Batch()
                self._committing = batch
                pages: dict[tuple[str, str, int], tuple[list[int], int]] = {}
                for bm, i in batch.bits:
                    if bm.key is not None and bm in self.maps:
                        p = i // PAGE_BITS
                        offsets, _ = pages.setdefault((*bm.key, p), ([], bm.page_len(p)))
                        offsets.append(i - p * PAGE_BITS)
            try:
                if pages:
                    with self.md.transaction() as tx:
                        for (owner, kind, p), (offsets, length) in pages.items():
                            tx.set_bits(owner, kind, p, offsets, length)
            except BaseException as e:
                self._failed(batch, None, {}, set(), e)
                raise
            self._committed(batch)
        return True

    def _take_sync_fds(self) -> tuple[set[int], int]:
        """Under ``maps_lock``: the volumes a commit fdatasyncs before it
        writes, and its epoch (copies noted before this are in them)."""
        fds, self._sync_fds = self._sync_fds, set()
        self.epoch += 1
        return fds, self.epoch

    def _sync_all(self, fds: set[int], epoch: int) -> None:
        """fdatasync them; then what was copied into them before ``epoch``
        began is durable."""
        for fd in fds:
            self.sync_volume(fd)
        self.synced_epoch = epoch

    def _committed(self, batch: Batch) -> None:
        """The batch's bits are durable: set them in memory, wake its waiters."""
        with self.maps_lock:
            for bm, i in batch.bits:
                bm.set_committed(i)
                self._requested.pop((id(bm), i), None)
            self._committing = self._committing_flush = None
        self.commits += 1
        batch.event.set()

    def _compose(self, batch: Batch) -> dict[tuple[str, str, int], bytes]:
        """Snapshot the pages to write: dirty pages plus the batch's bits."""
        extra: dict[tuple[Bitmap, int], list[int]] = {}
        for bm, i in batch.bits:
            extra.setdefault((bm, i // PAGE_BITS), []).append(i)
        pages: dict[tuple[str, str, int], bytes] = {}
        for bm in list(self.maps):
            for p in bm.take_dirty():
                extra.setdefault((bm, p), [])
        for (bm, p), bits in extra.items():
            if bm.key is None or bm not in self.maps:
                continue
            pages[(*bm.key, p)] = bm.page_with(p, bits)
        return pages

    def _failed(self, batch: Batch, flushed: Batch | None, pages, fds,
                exc: BaseException) -> None:
        """Nothing was committed: keep the pages dirty, fail the waiters."""
        with self.maps_lock:
            self._sync_fds |= fds - self.failed_fds.keys()
            for bm in self.maps:
                for (owner, kind, p) in pages:
                    if bm.key == (owner, kind):
                        bm.dirty_pages.add(p)
            for bm, i in batch.bits:
                self._requested.pop((id(bm), i), None)
            self._committing = self._committing_flush = None
            if flushed is not None:  # not durable: the next one carries them
                self._open_flush.until_flush += flushed.until_flush
        for b in (batch, flushed):
            if b is not None:
                b.error = exc
                b.event.set()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A direct transaction (admin operations), ordered with group commits.

        Holds ``commit_lock`` and ``maps_lock`` throughout; volumes with copied
        data are fdatasync'ed first, so pages it saves obey rule 2 too.
        In-memory changes are registered with ``tx.then``: they run after
        COMMIT, still under the lock, and not at all if it fails.
        """
        with self.commit_lock, self.maps_lock:
            fds, epoch = self._take_sync_fds()
            try:
                self._sync_all(fds, epoch)
            except BaseException:
                self._sync_fds |= fds - self.failed_fds.keys()
                raise
            with self.md.transaction() as tx:
                yield tx
            for change in tx.after_commit:
                change()

