"""The rules, in one place: host requests on a volume that has clones or a
restore, and the steps the background jobs take on the same maps.

A ``Family`` is a source volume and its clones.  It is the Policy of the
source's Volume; each clone's Volume gets a ``CloneExport`` policy.  All
their maps are guarded by one lock (``maps_lock``, owned by
``commit.Committer``: lock order and the no-waiting rule are written
there), and map bits follow the committer: set = committed, cleared lazily.

Maps (docs/DESIGN.md, "Maps"):
    clone.delta        per clone: extent may differ between source and clone
    guard.inflight     copy-on-demand map: extent -> Event, a copy in flight
    guard.writers      extent -> count of host writes between decision and end
    restore.pending    restore-pending map: extents still to copy clone->source
    restore.protected  protected restore map: extents the host wrote
    restore.captured   captured map: the extent's pre-restore data is in the
                       undo image (``undo.py``); None without an undo image

Host write / trim / zero on the source, per extent touched:
    in flight                        -> wait for the copy, then decide again
    restore pending, not protected,
      partial                        -> copy on demand clone->source first;
                                        pending cleared and protected set in
                                        memory, committed together by the
                                        next commit (a flush waits for it)
      covering the whole extent      -> no copy; write, then protected set
                                        in memory after the data (the bit
                                        stops the copy, so it follows the
                                        data, like rule 2); requests on that
                                        extent wait for this write to end
      neither waits for a commit: a crash before it finds the extent still
      pending, and copying it again undoes only unflushed writes (rule 3);
      with an undo image, both first wait for the extent's capture (below)
    restoring clone                  -> protected bit committed, then write
                                        (unprotected restore: also mirrored)
    fractured clone                  -> delta bit committed, then write
    synchronizing clone              -> delta bit committed, then write
    synchronized clone               -> delta bits of its intent chunk
                                        committed as a write intent (md's
                                        bitmap), then write to both;
                                        ``sweep_intents`` clears idle chunks
                                        once both copies are durable
A one-extent write whose bits are all committed takes the fast path
(``refresh_fast``): no lock, no map change.
Host read on the source: wait for in-flight copies (and whole-extent writes
into pending extents), not for captures (nothing is copied into the source
there: ``ExtentGuard.capturing``); read pending extents from the clone,
the rest from the source.  A read copies nothing: the job copies those
extents later.
Host write on a clone: allowed only while fractured; sets its delta bit.

Background copies (jobs.py drives them, these methods decide):
    take_runs    picks runs of extents not in flight, not being written,
                 not protected; marks them in flight
    finish_runs  clears their bits *after* the copy returned, records the
                 destination for fdatasync before the next commit (rule 2)
A job never clears a bit while a host write to that extent is in progress,
and a host write never starts on an extent in flight: that is claim 1.

Capture (a restore that keeps an undo image): whatever overwrites a pending
extent of the source (``copy_runs`` into the source, ``copy_on_demand``, a
write covering it whole) first calls ``capture``: the source's old data is
copied into the undo image and fdatasynced, the captured bits committed,
and only then the source written.  The extents are in flight or being
written meanwhile, so nothing else changes them.  A host request's capture
takes the idle extents of its ``CAPTURE_BLOCK`` along (in flight until
their bits are committed; reads of them go on), and concurrent captures
share one fdatasync (``Committer.sync_shared``) and one commit: the cost
is per capture, not per byte.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import threading
import time
from typing import Callable

from . import faults
from . import volume as vf
from .bitmap import Bitmap, extent_range
from .commit import Batch, Committer
from .errors import LuncloneError, ReadOnly
from .iopath import Volume, WriteBarrier
from .store import Store, copy_range, is_local, start_writeback

log = logging.getLogger("lunclone.policy")

SYNCHRONIZING = "synchronizing"
SYNCHRONIZED = "synchronized"
FRACTURED = "fractured"
RESTORING = "restoring"
RUNNING, PAUSED, DONE = "running", "paused", "done"
CLONE_STATES = (SYNCHRONIZING, SYNCHRONIZED, FRACTURED, RESTORING)
RESTORE_STATES = (RUNNING, PAUSED, DONE)
MIRRORED = (SYNCHRONIZED, SYNCHRONIZING)  # states that follow the source
# Write intents go by chunks of 2**INTENT_CHUNK_SHIFT extents (md's bitmap
# chunk; 4 MiB at 64 KiB extents): the first write into a chunk commits the
# intent bits of the whole chunk, so that later writes near it take the fast
# path, and the sweep clears a chunk's bits once no write touched any of
# its extents for a round.  After a crash or a failed mirror write, a sync
# copies those chunks: a few MiB each, for one commit per chunk instead of
# one per extent.
INTENT_CHUNK_SHIFT = 6
# Extents a host request's capture takes along (``Family.capture``): a
# capture costs an fdatasync and a commit, whether of 64 KiB or of 1 MiB.
CAPTURE_BLOCK = 16


class Progress:
    """Bytes copied by a job and the rate over the last seconds."""

    def __init__(self, copied_bytes: int = 0):
        self.copied_bytes = copied_bytes
        self.started = time.monotonic()
        self._window: list[tuple[float, int]] = [(self.started, copied_bytes)]

    def add(self, n: int) -> None:
        self.copied_bytes += n
        now = time.monotonic()
        self._window.append((now, self.copied_bytes))
        while len(self._window) > 2 and now - self._window[1][0] > 5.0:
            self._window.pop(0)

    def rate(self) -> float:
        """Bytes/s over the last ~5 s (at least 1 s, so a first burst does not
        read as a huge rate)."""
        t0, b0 = self._window[0]
        t1, b1 = time.monotonic(), self.copied_bytes
        return (b1 - b0) / max(t1 - t0, 1.0)


class Clone:
    def __init__(self, name: str, volume: Volume, state: str, delta: Bitmap):
        self.name = name
        self.volume = volume
        self.family: Family | None = None
        self._state = state
        self.delta = delta
        self.sync_progress = Progress()  # of its current sync
        self.error: str | None = None
        self.hot: set[int] = set()  # extents written since the last intent sweep
        self.mirror_failures = 0  # mirror writes or flushes to it that failed
        # While a fracture waits for mirrored writes to end: extents written
        # under the fractured rules (their bits are real differences).
        self.fracturing: set[int] | None = None

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        if self.family is not None:
            self.family.refresh_fast()


class Restore:
    def __init__(self, clone: Clone, protected_mode: bool, pending: Bitmap,
                 protected: Bitmap, total_extents: int, captured: Bitmap | None = None,
                 undo_store: Store | None = None):
        self.clone = clone
        # The undo image and what it holds (``undo.py``); None: --no-undo.
        self.captured = captured
        self.undo_store = undo_store
        # "undo": a restore back to the pre-restore image of the last one,
        # reading from ``undo_from`` (``undo.UndoSource``); it captures nothing.
        self.kind = "restore"
        self.undo_from: Store | None = None
        self.protected_mode = protected_mode
        self.pending = pending
        self.protected = protected
        self.total_extents = total_extents
        self.state = RUNNING
        self.progress = Progress()
        self.on_demand = 0
        self.rate_limit = 0
        self.error: str | None = None
        self.ready = threading.Event()  # set once the start is committed
        # An unprotected restore whose mirror failed goes on protected: the
        # clone is no longer written, and is resynchronized once it is done.
        self.mirror_lost = False
        # Extents the job copied with no write-back of its own, each with the
        # committer's epoch then: until a full commit of a later epoch has
        # fdatasync'ed the source, a protected bit there waits for one
        # (``Family.copy_durable``).  Pruned as the epochs go by.
        self.unsynced: dict[int, int] = {}
        self.pruned_at = 0

    @property
    def mirrored(self) -> bool:
        """Are host writes mirrored to the clone (``--unprotected``)?"""
        return not self.protected_mode and not self.mirror_lost

    @property
    def data_source(self) -> Store:
        """Where the restore reads the data of an extent still pending: the
        one answer, for copies on demand and for the job alike."""
        return self.undo_from or self.clone.volume.store


class ExtentGuard:
    """Extents that are busy, under the maps lock: a copy in flight, or
    host writes between their decision and their end.  A request on an
    extent being copied waits for the copy (claim 1 of the design); a copy
    never starts on an extent being written."""

    def __init__(self) -> None:
        self.inflight: dict[int, threading.Event] = {}  # set when the copy ends
        # Of those, extents in flight for a capture only (taken along by a
        # host request's capture, ``Family.capture``): nothing is copied
        # into the source there, so reads need not wait.  A reader that
        # looks without the lock never takes a copy for a capture: no copy
        # starts on an extent in flight, and ``end_copies`` drops both
        # marks under the lock.
        self.capturing: set[int] = set()
        self.writers: dict[int, int] = {}
        # Reads taking data from a restore's clone: the restore does not
        # finish (and its clone cannot change) under them.
        self.clone_readers = 0
        # The same for reads that decided without the lock (``Family.pread``):
        # each appends before it looks at the maps and pops when done
        # (list.append/pop are atomic; a count += 1 is not).
        self.lock_free_clone_reads: list[None] = []
        # Set when an extent's last writer ends (only if someone waits).
        self.writer_done: dict[int, threading.Event] = {}

    def copying(self) -> bool:
        return bool(self.inflight)

    def reading_clone(self) -> bool:
        return self.clone_readers > 0 or bool(self.lock_free_clone_reads)

    def writing(self, i: int) -> bool:
        return bool(self.writers.get(i))

    def no_writers(self) -> bool:
        return not self.writers

    def busy(self, i: int) -> bool:
        return i in self.inflight or bool(self.writers.get(i))

    def copy_blocking(self, i: int, reading: bool) -> threading.Event | None:
        """The copy in flight on extent ``i`` a request must wait for, if
        any (a read does not wait for a capture)."""
        ev = self.inflight.get(i)
        return None if ev is None or (reading and i in self.capturing) else ev

    def blocks_reads(self, i: int) -> bool:
        """Must a read of extent ``i`` wait (``Family._read_one_extent``)?"""
        return self.copy_blocking(i, True) is not None or bool(self.writers.get(i))

    def writes_end(self, i: int) -> threading.Event:
        """An event set once the writes now on extent ``i`` have ended."""
        return self.writer_done.setdefault(i, threading.Event())

    def start_copies(self, exts, capture_only: bool = False) -> None:
        """One event for extents whose copy starts together (a job's runs,
        an on-demand copy, a capture's neighbours: ``capture_only``): they
        must end together, in one ``end_copies`` of the same extents, so a
        waiter woken by the event never finds one of them still in flight
        on it."""
        ev = threading.Event()
        for i in exts:
            self.inflight[i] = ev
        if capture_only:
            self.capturing.update(exts)
        else:
            self.capturing.difference_update(exts)

    def end_copies(self, exts) -> None:
        last = None
        for i in exts:
            ev = self.inflight.pop(i, None)
            self.capturing.discard(i)
            if ev is not None and ev is not last:
                ev.set()
                last = ev

    def start_write(self, exts: range) -> None:
        for i in exts:
            self.writers[i] = self.writers.get(i, 0) + 1

    def end_write(self, exts: range) -> None:
        for i in exts:
            n = self.writers[i] - 1
            if n:
                self.writers[i] = n
            else:
                del self.writers[i]
                ev = self.writer_done.pop(i, None)
                if ev is not None:
                    ev.set()


@dataclasses.dataclass
class WritePlan:
    """What a host write on the source does once its extents are ready."""
    exts: range
    batches: list[Batch | None]  # map bits committed before the data is written
    mirrors: list[Clone]  # clones the data is written to as well
    # Pending extents the write covers whole: no copy first; protected
    # once the write has landed (``_protect_after_write``).
    protect_after: list[int]
    # The restore the plan was made under: an undo may replace it behind
    # the gate while this write is still going (``Restores.undo_begin``).
    restore: "Restore | None" = None


class Family:
    """The policy of a source volume with clones (see the module docstring)."""

    def __init__(self, source: Volume, committer: Committer, maps_lock: threading.RLock,
                 on_mirror_failed: Callable[[Clone], None] | None = None):
        self.source = source
        self.committer = committer
        self.maps_lock = maps_lock
        self.shift = source.shift
        self.nextents = (source.size + source.extent_size - 1) >> source.shift
        self.clones: dict[str, Clone] = {}
        self._restore: Restore | None = None
        self.last_restore: Restore | None = None
        # The fast path (see ``refresh_fast``): the maps whose bits a write
        # checks, and the synchronized clones it also writes to; one tuple,
        # read once, so a writer never pairs old maps with new mirrors.
        self.fast: tuple[list[bytearray], list[Clone]] | None = None
        self.plain_reads = True  # no restore: a read is a plain read
        self.fast_writes = WriteBarrier()  # writes that may take the fast path
        self._fast_before: list[list[None]] = []  # switched out, maybe not ended
        self.guard = ExtentGuard()
        self.on_mirror_failed = on_mirror_failed

    # -- membership and the fast path ------------------------------------------
    @property
    def restore(self) -> Restore | None:
        return self._restore

    @restore.setter
    def restore(self, value: Restore | None) -> None:
        self._restore = value
        self.refresh_fast()

    def undo_point(self) -> Restore | None:
        """The restore whose undo image is kept (running or done), if any."""
        r = self._restore or self.last_restore
        return r if r is not None and r.captured is not None else None

    def add_clone(self, clone: Clone) -> None:
        clone.family = self
        self.clones[clone.name] = clone
        self.refresh_fast()

    def remove_clone(self, name: str) -> None:
        clone = self.clones.pop(name)
        clone.family = None
        self.refresh_fast()

    def refresh_fast(self) -> None:
        """The fast path is on while no clone is synchronizing or being
        fractured and no restore runs, or one runs past its start (then
        every other clone is fractured).  A write into one extent whose
        bits are all set then needs no lock, no map change and no copy:
        each fractured clone's delta bit (the steady state of rule 4), the
        restore's protected bit (a protected extent is never copied again,
        so nothing can be in flight on it; ``--unprotected``: the write goes
        to the restoring clone too, as ``_write`` mirrors it), each
        synchronized clone's committed write-intent bit (the write goes to
        that clone too, and its extent into ``clone.hot`` *before* the bit
        is read: ``clear_intents``).  Nothing can copy into a mirror, and
        whatever takes a clone out of that state quiesces what ``switch_fast`` returns
        before its first copy or clear (a restoring clone whose mirror
        failed is read only where the host never wrote: a late mirror write
        there is harmless until its resync, which quiesces first)."""
        r = self._restore
        self.plain_reads = r is None
        others = [c for c in self.clones.values() if r is None or c is not r.clone]
        mirrors = [c for c in others if c.state == SYNCHRONIZED]
        fast_ok = (r is None or (r.ready.is_set() and not mirrors)) and all(
            c.state in (FRACTURED, SYNCHRONIZED) and c.fracturing is None for c in others)
        if fast_ok:
            maps = [c.delta.bits for c in others]
            if r is not None:
                maps.append(r.protected.bits)
                if r.mirrored:
                    mirrors = [r.clone]
            self.fast = (maps, mirrors)
        else:
            self.fast = None

    def switch_fast(self) -> list[list[None]]:
        """After a state change under the lock: every generation of writes
        that may have passed the fast path under the old state and was not
        seen ended (quiesce them all).  Not only the one switched out now:
        an intent sweep switches generations too, and a write it is still
        waiting for (or gave up on) is in an older one."""
        old = self.fast_writes.switch()
        self._fast_before = [gen for gen in self._fast_before if gen] + [old]
        return list(self._fast_before)

    # -- host requests on the source -----------------------------------------
    def pread(self, vol: Volume, buf, offset: int) -> None:
        r = self._restore
        started = r is not None and self._started(r)
        if r is None or (started and _all_copied(r, offset, len(buf), self.shift)):
            vf.read_into(vol.fd, buf, offset)  # no lock: see ``_all_copied``
            return
        if started and self._read_one_extent(r, vol, buf, offset):
            return
        r, from_clone = self._prepare_read(offset, len(buf))
        if not from_clone:
            vf.read_into(vol.fd, buf, offset)
            return
        try:
            for start, stop, pending in self._read_parts(offset, len(buf), from_clone):
                part = memoryview(buf)[start - offset:stop - offset]
                if pending:
                    r.data_source.pread(part, start)
                else:
                    vf.read_into(vol.fd, part, start)
        finally:
            with self.maps_lock:
                self.guard.clone_readers -= 1

    def _started(self, r: Restore) -> bool:
        """Without the lock: is ``r`` a restore whose start is committed?  Its
        gate also opens when the start fails, but only after the restore
        was taken back (``Restores.begin``): then it is no longer ours."""
        return r.ready.is_set() and self._restore is r

    def _read_one_extent(self, r: Restore, vol: Volume, buf, offset: int) -> bool:
        """A read within one extent, without the lock: from the source if the
        extent is copied or protected, from the clone if it is pending and no
        copy (a capture is none) is in flight nor a write there; False (not read) if it
        must wait or spans extents.  Counted in ``lock_free_clone_reads``
        before it looks, so a restore that finishes meanwhile (its clone may
        change afterwards) either waits for it or was seen finished: then
        the pending bit is clear and the source is read."""
        i = offset >> self.shift
        if (offset + len(buf) - 1) >> self.shift != i:
            return False
        guard = self.guard
        reads = guard.lock_free_clone_reads
        reads.append(None)
        try:
            byte, bit = i >> 3, i & 7
            if not r.pending.bits[byte] >> bit & 1 or r.protected.bits[byte] >> bit & 1:
                vf.read_into(vol.fd, buf, offset)
                return True
            if guard.blocks_reads(i):
                return False
            r.data_source.pread(buf, offset)
            return True
        finally:
            reads.pop()

    def pwrite(self, vol: Volume, buf, offset: int, fua: bool) -> None:
        # Fast path: one extent whose bits are committed in every map of
        # ``refresh_fast``.  Entered in the barrier first, then checked, so
        # that a state change followed by a quiesce of ``switch_fast``'s
        # generations never misses a write in progress.
        gen = self.fast_writes.current
        gen.append(None)
        try:
            fast = self.fast
            if fast is not None:
                i = offset >> self.shift
                if (offset + len(buf) - 1) >> self.shift == i:
                    maps, mirrors = fast
                    for clone in mirrors:
                        clone.hot.add(i)
                    byte, bit = i >> 3, i & 7
                    for bits in maps:
                        if not bits[byte] >> bit & 1:
                            break
                    else:
                        if mirrors:
                            self._write_fast(vol, buf, offset, mirrors)
                        else:
                            vf.write_from(vol.fd, buf, offset)
                        if fua:
                            self.flush(vol)
                        return
        finally:
            gen.pop()
        self._write(offset, len(buf), fua, lambda store: store.pwrite(buf, offset))

    def _write_fast(self, vol: Volume, buf, offset: int, mirrors: list[Clone]) -> None:
        """The fast path's mirrored write: the source, then each mirror (as
        ``_write`` does; a failure sends the clone back to synchronizing)."""
        try:
            vf.write_from(vol.fd, buf, offset)
        except OSError as e:
            r = self._restore  # (its protected bit covers the restoring clone)
            for clone in mirrors:
                if r is None or r.clone is not clone:
                    self.mirror_broken(clone, "write (source failed)", e)
            raise
        for clone in mirrors:
            try:
                clone.volume.store.pwrite(buf, offset)
            except OSError as e:
                self.mirror_broken(clone, "write", e)

    def trim(self, vol: Volume, count: int, offset: int, fua: bool) -> None:
        self._write(offset, count, fua, lambda store: store.zero(offset, count))

    def zero(self, vol: Volume, count: int, offset: int, fua: bool,
             may_trim: bool = True, fast: bool = False) -> None:
        if fast and self._needs_copy(offset, count):
            raise OSError(errno.ENOTSUP, "a fast zero here would need a copy on demand")
        source = self.source.store
        self._write(offset, count, fua,
                    lambda store: store.zero(offset, count, may_trim or store is not source))

    def _needs_copy(self, offset: int, length: int) -> bool:
        if self._restore is None:
            return False
        exts = extent_range(offset, length, self.shift)
        r = self._restore
        with self.maps_lock:
            return bool(self._copies_needed(exts, offset, length)
                        or any(self.guard.copy_blocking(i, False) for i in exts)
                        or (r.captured is not None and any(  # a capture is a copy too
                            r.pending.test(i) and not r.protected.test(i)
                            and not r.captured.test(i) for i in exts)))

    def extents(self, vol: Volume, count: int, offset: int,
                one: bool) -> list[tuple[int, int, bool]]:
        """Block status of the source as a read sees it: during a restore a
        pending extent reads the clone's data, so it is never a hole.  The
        pending bits are read first: an extent whose bit is clear by then
        was copied already, and the file's holes read after that are true."""
        r = self._restore
        if r is None:
            return vol.store.extents(offset, count, one)
        first, last = offset >> self.shift, (offset + count - 1) >> self.shift
        with self.maps_lock:
            pending = [i for i in _set_bits_between(r.pending, first, last)
                       if not r.protected.test(i)]
        runs = vol.store.extents(offset, count, False)
        if pending:
            runs = _as_data(runs, pending, self.shift)
        return runs[:1] if one else runs

    def flush(self, vol: Volume) -> None:
        """The source's data and the protected bits of writes into pending
        extents (rule 3), then each mirror's data; a mirror that cannot
        flush is resynchronized (its write-intent bits are set), the host's
        flush does not fail for it."""
        self.committer.sync_volume(self.source.fd)
        self.committer.commit_for_flush()
        for clone in self._mirrors():
            try:
                clone.volume.store.flush()
            except OSError as e:
                self.mirror_broken(clone, "flush", e)

    def _write(self, offset: int, length: int, fua: bool, do: Callable[[Store], None]) -> None:
        plan = self._plan_write(offset, length)
        try:
            if plan.protect_after:  # no copy first: its old data is kept now
                self.capture(plan.restore, plan.protect_after, along=True)
            if faults.armed is not None:
                faults.hit("write.bits_committed")
            try:
                do(self.source.store)
            except OSError as e:
                # Part of it may have landed: synchronized mirrors' intent
                # bits must not be swept as if both copies were equal.  (The
                # restoring clone needs nothing: its protected or pending
                # bit covers the extent.)
                r = self._restore
                for clone in plan.mirrors:
                    if r is None or r.clone is not clone:
                        self.mirror_broken(clone, "write (source failed)", e)
                raise
            for clone in plan.mirrors:
                self._mirror(clone, do)
            if plan.protect_after:
                self._protect_after_write(plan.restore, plan.protect_after)
            if fua:
                self.flush(self.source)
        finally:
            self._end_write(plan.exts)

    def _protect_after_write(self, r: Restore, late: list[int]) -> None:
        """Protect pending extents a write covered whole, now that it landed.

        No copy preceded this write, so until the write is durable the
        extent holds pre-restore data: the protected bit (which stops the
        copy) must follow the data, as a pending bit's clear does (rule 2),
        and it is committed with the next commit, which the next flush
        waits for (rule 3).  A crash before that commit copies the clone's
        data again over a write that was never flushed."""
        with self.maps_lock:
            self.committer.check_writable(self.source.fd)
            for i in late:
                self.committer.set_until_flush(r.protected, i, self.source.fd)

    def _mirror(self, clone: Clone, do: Callable[[Store], None]) -> None:
        """Write to a mirror; if that fails, its write-intent bits (set) record
        the difference and the clone goes back to synchronizing."""
        try:
            do(clone.volume.store)
        except OSError as e:
            self.mirror_broken(clone, "write", e)

    def mirror_broken(self, clone: Clone, what: str, e: OSError) -> None:
        """A mirror write or flush failed; the clone's bits record where it
        may differ.  A synchronized clone goes back to synchronizing.  The
        clone of an unprotected restore is the restore's data source: it is
        never written by a copy, so the restore goes on protected and the
        clone is resynchronized from the source once the restore is done."""
        r = self._restore
        with self.maps_lock:
            clone.mirror_failures += 1
            if r is not None and r.clone is clone:
                r.mirror_lost = True
                self.refresh_fast()
                r.error = (f"mirror {what} to {clone.name} failed ({e.strerror or e}); the "
                           f"restore goes on protected and {clone.name} is resynchronized "
                           "when it is done")
                log.error("restore of %s: %s", self.source.name, r.error)
                return
            if clone.state == SYNCHRONIZED:
                clone.state = SYNCHRONIZING
        log.error("mirror %s to clone %s failed: %s; it will be resynchronized",
                  what, clone.name, e)
        clone.error = f"mirror {what} failed: {e.strerror or e}"
        if self.on_mirror_failed:
            self.on_mirror_failed(clone)

    def idle_intents(self, clone: Clone) -> list[int]:
        """Under lock, first half of a sweep: the write-intent bits of a
        synchronized clone in chunks no write touched since the last sweep,
        none being written now.  Their slow-path writes ended before this
        call, and the sweep waits for fast-path ones, so a flush of the
        clone started after that makes them durable."""
        if clone.state != SYNCHRONIZED or self.clones.get(clone.name) is not clone:
            clone.hot = set()
            return []
        hot = _chunks(clone.hot)
        clone.hot = set()
        return [i for i in clone.delta.iter_set()
                if i >> INTENT_CHUNK_SHIFT not in hot and not self.guard.writing(i)]

    def clear_intents(self, clone: Clone, idle: list[int]) -> int:
        """Under lock, second half: the clone was flushed after ``idle_intents``
        (and the fast-path writes begun before it had ended); clear the
        bits no write touched meanwhile.  The source is fdatasync'ed (and a
        local clone too) before the clear is committed (rule 2).

        A fast-path write takes no lock: it adds its extent to ``clone.hot``
        and then reads the bit.  So the bits are cleared first and ``hot``
        read after: a write that saw its bit still set is in ``hot`` by
        then, and its bit is set back (it is still the committed state: no
        commit runs while the lock is held); any later write sees the bit
        clear and takes the slow path."""
        if clone.state != SYNCHRONIZED or self.clones.get(clone.name) is not clone or any(
                fd in self.committer.failed_fds for fd in (self.source.fd, clone.volume.fd)):
            return 0
        delta = clone.delta
        for i in idle:
            delta.clear(i)
        cleared = []
        hot = _chunks(clone.hot)
        for i in idle:
            if i >> INTENT_CHUNK_SHIFT in hot or self.guard.writing(i):
                delta.set_committed(i)
            else:
                cleared.append(i)
        if cleared:
            self.committer.copied_into(self.source.fd)
            self._copied_into(clone.volume.store)
        return len(cleared)

    def _on_failed_volume(self, *stores: Store | None) -> bool:
        """Under lock: did the write-back of one of these (local) volumes
        fail?  Then no clear may depend on a copy to or from it."""
        return any(s is not None and is_local(s) and s.fd in self.committer.failed_fds
                   for s in stores)

    def _copied_into(self, store: Store) -> None:
        """A local store is fdatasync'ed by the next commit; a remote one was
        flushed by ``copy_range`` (or by the sweep) already."""
        if is_local(store):
            self.committer.copied_into(store.fd)

    def _mirrors(self) -> list[Clone]:
        mirrors = [c for c in list(self.clones.values()) if c.state == SYNCHRONIZED]
        r = self.restore
        if r is not None and r.mirrored:
            mirrors.append(r.clone)
        return mirrors

    def _prepare_read(self, offset: int, length: int) -> tuple[Restore | None, set[int]]:
        """Wait for what blocks the extents (a copy in flight, ...); then
        the restore and its extents that the read takes from the clone.

        A pending extent is read where its data lies, in the clone, and
        copied later by the job (dm-clone and qemu's block-stream do the
        same): a read changes no map, so it needs no copy and no commit.
        Requests that change the extent (a write) copy it first; once it
        is copied or protected, reads go to the source."""
        exts = extent_range(offset, length, self.shift)
        while True:
            with self.maps_lock:
                wait_for = self._blocker(exts, reading=True)
                if wait_for is None:
                    r = self._restore
                    if r is None:
                        return None, set()
                    from_clone = {i for i in exts
                                  if r.pending.test(i) and not r.protected.test(i)}
                    if from_clone:  # counted until done: see ``Restores.finish``
                        self.guard.clone_readers += 1
                    return r, from_clone
            wait_for.wait()

    def _read_parts(self, offset: int, length: int,
                    from_clone: set[int]) -> list[tuple[int, int, bool]]:
        """[start, stop) runs of a read, each from the clone or not."""
        shift, end = self.shift, offset + length
        parts: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            stop = min(end, ((pos >> shift) + 1) << shift)
            side = (pos >> shift) in from_clone
            if parts and parts[-1][2] == side:
                parts[-1] = (parts[-1][0], stop, side)
            else:
                parts.append((pos, stop, side))
            pos = stop
        return parts

    def _plan_write(self, offset: int, length: int) -> WritePlan:
        """Wait for what blocks a write's extents and copy on demand the
        pending ones it covers in part; once ready, register it as a writer
        of its extents and wait for the commit of the map bits it needs."""
        exts = extent_range(offset, length, self.shift)
        while True:
            with self.maps_lock:
                step = self._next_step(exts, offset, length)
                if step is None:
                    self.guard.start_write(exts)
                    plan = self._write_plan(exts)
                    break
            step()
        try:
            _wait(plan.batches)
        except BaseException:
            self._end_write(exts)
            raise
        return plan

    def _next_step(self, exts: range, offset: int, length: int) -> Callable[[], None] | None:
        """Under the lock: what must happen before the request can decide
        (wait for an event, or copy extents on demand, marked in flight
        here), to be done without the lock; None once the extents are ready."""
        wait_for = self._blocker(exts)
        if wait_for is not None:
            return wait_for.wait
        todo = self._copies_needed(exts, offset, length)
        if not todo:
            return None
        self.guard.start_copies(todo)
        return functools.partial(self.copy_on_demand, todo, self.restore)

    def _blocker(self, exts: range, reading: bool = False) -> threading.Event | None:
        """What this request must wait for first, if anything.

        Besides copies in flight (for a read, not captures: the source is
        not written there), a request waits for a whole-extent write into a
        pending extent: that write copies nothing, so the source holds
        neither the clone's data nor the new data until it has landed and
        its protected bit is committed."""
        r = self.restore
        if r is not None and not r.ready.is_set():
            return r.ready
        guard = self.guard
        for i in exts:
            ev = guard.copy_blocking(i, reading)
            if ev is not None:
                return ev
            if (r is not None and guard.writing(i)
                    and r.pending.test(i) and not r.protected.test(i)):
                return guard.writes_end(i)
        return None

    def _copies_needed(self, exts: range, offset: int, length: int) -> list[int]:
        """The pending extents a write covers only in part: copied first."""
        r = self.restore
        if r is None:
            return []
        end = offset + length
        shift = self.shift
        todo = []
        for i in exts:
            if not r.pending.test(i) or r.protected.test(i):
                continue
            whole = offset <= i << shift and min((i + 1) << shift, self.source.size) <= end
            if not whole:
                todo.append(i)
        return todo

    def _write_plan(self, exts: range) -> WritePlan:
        """Under the lock: the map bits this write needs committed first,
        its mirrors, and the pending extents it covers whole."""
        batches: list[Batch | None] = []
        mirrors: list[Clone] = []
        late: list[int] = []
        req = self.committer.request
        r = self.restore
        for clone in self.clones.values():
            st = clone.state
            if st == SYNCHRONIZED:
                batches += self._intents(clone.delta, exts)
                clone.hot.update(exts)
                mirrors.append(clone)
            elif st in (FRACTURED, SYNCHRONIZING):
                batches += [req(clone.delta, i) for i in exts]
                if clone.fracturing is not None:
                    clone.fracturing.update(exts)
            elif st == RESTORING and r is not None and r.clone is clone:
                for i in exts:
                    if r.pending.test(i) and not r.protected.test(i):
                        late.append(i)
                    else:
                        batches.append(req(r.protected, i, self.copy_durable(r, i)))
                if r.mirrored:
                    mirrors.append(clone)
        return WritePlan(exts, batches, mirrors, late, r)

    def _intents(self, delta: Bitmap, exts: range) -> list[Batch | None]:
        """Under the lock: the write-intent bits a mirrored write needs
        committed, whole chunks of them (INTENT_CHUNK_SHIFT)."""
        if all(delta.test(i) for i in exts):
            return []
        first = exts.start >> INTENT_CHUNK_SHIFT << INTENT_CHUNK_SHIFT
        stop = min((((exts.stop - 1) >> INTENT_CHUNK_SHIFT) + 1) << INTENT_CHUNK_SHIFT,
                   self.nextents)
        req = self.committer.request
        return [req(delta, i) for i in range(first, stop)]

    def _end_write(self, exts: range) -> None:
        with self.maps_lock:
            self.guard.end_write(exts)

    # -- copies ------------------------------------------------------------------
    def capture(self, r: Restore, exts, along: bool = False) -> None:
        """Keep the pre-restore data of these extents of the source before
        it is overwritten (see the module docstring): no lock held, the
        extents in flight or being written by the caller.  Extents not
        pending (their old data is the clone's) or captured already are
        skipped.  Raises OSError (a full disk, say) with nothing changed
        but the undo image: the caller then does not overwrite them.

        ``along`` (a host request's capture): idle extents of the same
        ``CAPTURE_BLOCK`` are captured too, under the same fdatasync and
        commit, so host I/O spread over the volume pays a capture per
        block, not per extent."""
        if r.captured is None:
            return
        with self.maps_lock:
            todo = [i for i in exts if r.pending.test(i) and not r.captured.test(i)]
            if not todo:
                return
            along_with = self._take_neighbours(r, todo) if along else []
        store, source = r.undo_store, self.source.store
        try:
            self.committer.check_writable(store.fd)
            self.committer.check_writable(source.fd)
            self._copy_old_data(source, store, todo)
            if along_with and not self._capture_along(source, store, along_with):
                along_with = []  # (released)
            if faults.armed is not None:
                faults.hit("capture.data_written")
            self.committer.sync_shared(store.fd)  # durable before its bits (rule 5)
            with self.maps_lock:
                batches = [self.committer.request(r.captured, i) for i in todo + along_with]
            try:
                _wait(batches)
            except LuncloneError as e:  # as a copy's error: the job retries, then pauses
                raise OSError(e.errno, f"capture for the undo image: {e.message}") from e
        finally:
            if along_with:  # held until their bits are in: a request on them finds them captured
                self._release(along_with)

    def _take_neighbours(self, r: Restore, todo: list[int]) -> list[int]:
        """Under lock: the idle extents of ``todo``'s blocks that still need
        a capture, marked in flight (nothing overwrites them meanwhile);
        none while the admin holds the restore paused (no I/O it need not)."""
        if r.state == PAUSED:
            return []
        mine, found = set(todo), []
        for block in sorted({i // CAPTURE_BLOCK for i in todo}):
            for i in range(block * CAPTURE_BLOCK, min((block + 1) * CAPTURE_BLOCK, self.nextents)):
                if (i not in mine and r.pending.test(i) and not r.captured.test(i)
                        and not r.protected.test(i) and not self.guard.busy(i)):
                    found.append(i)
        if found:
            self.guard.start_copies(found, capture_only=True)
        return found

    def _copy_old_data(self, source: Store, image: Store, exts: list[int]) -> None:
        for first, n in _runs_of(exts):
            self._copy_run(source, image, first, n)

    def _capture_along(self, source: Store, image: Store, exts: list[int]) -> bool:
        """Copy neighbours' old data too; on failure (a full disk) they are
        released and left for later: the request's own capture stands."""
        try:
            self._copy_old_data(source, image, exts)
            return True
        except OSError as e:
            log.warning("capture of neighbouring extents skipped: %s", e)
            self._release(exts)
            return False

    def copy_on_demand(self, todo: list[int], r: Restore) -> None:
        """Copy extents (already marked in flight) clone->source for a write
        that covers them in part, and protect them for it.

        Nothing waits for a commit: the clear of the pending bit and the set
        of the protected bit go out together with the next commit (the next
        flush waits for it, rule 3).  Until then the extent is pending in
        the metadata, so a crash copies it again, which only undoes writes
        that were never flushed.  ``r``: the restore the copy was decided
        under (an undo may replace it behind the gate meanwhile: its maps
        and data source are the ones to use)."""
        try:
            self.capture(r, todo, along=True)
            copied = 0
            for i in todo:
                copied += self.copy_extents(r.data_source, self.source.store, i, 1)
        except BaseException as e:
            self._release(todo)
            log.error("copy on demand from %s failed: %s", r.clone.name, e)
            raise
        with self.maps_lock:
            if self._on_failed_volume(self.source.store, r.data_source):
                self.guard.end_copies(todo)  # its write-back failed meanwhile
                raise OSError(errno.EIO, f"copy on demand from {r.clone.name}: a volume's "
                              "write-back failed; restart the daemon")
            for i in todo:  # (set_until_flush has the source fdatasync'ed first)
                r.pending.clear(i)
                self.committer.set_until_flush(r.protected, i, self.source.fd)
            r.on_demand += len(todo)
            r.progress.add(copied)
            self._copied_into(r.data_source)  # what was read is durable too
            self.guard.end_copies(todo)

    def copy_extents(self, src: Store, dst: Store, first: int, count: int) -> int:
        """Copy ``count`` extents from ``first``; no lock held (they are in flight)."""
        self.committer.check_writable(dst.fd)
        if is_local(src):  # its data may be lost: nothing is vouched for by it
            self.committer.check_writable(src.fd)
        n = self._copy_run(src, dst, first, count)
        if faults.armed is not None:
            faults.hit("copy.data_written")
        return n

    def _copy_run(self, src: Store, dst: Store, first: int, count: int) -> int:
        """``count`` extents from ``first`` (the last one ends at the volume's end)."""
        offset = first << self.shift
        return copy_range(src, dst, offset, min(count << self.shift, self.source.size - offset))

    def _release(self, exts) -> None:
        with self.maps_lock:
            self.guard.end_copies(exts)

    def take_runs(self, bm: Bitmap, start: int, limit: int, skip: Bitmap | None = None,
                  max_runs: int = 1) -> list[tuple[int, int]]:
        """Under lock: up to ``max_runs`` runs of consecutive extents from
        ``start`` on, ``limit`` extents in all, that are set in ``bm`` and
        copyable (not in flight, not being written), marked in flight:
        scattered extents are copied by one worker call, not one call each.
        Extents in ``skip`` (protected) are cleared from ``bm`` on the way:
        they need no copy.  One scan of the map, and one in-flight event
        for all of them: ``finish_runs`` ends them together."""
        guard = self.guard
        runs: list[tuple[int, int]] = []
        first = n = 0
        for i in bm.iter_set(start):
            if skip is not None and skip.test(i):
                bm.clear(i)
                continue
            if guard.busy(i):
                continue
            if n and i == first + n:
                n += 1
            elif n and len(runs) + 1 == max_runs:
                break
            else:
                if n:
                    runs.append((first, n))
                first, n = i, 1
            limit -= 1
            if limit <= 0:
                break
        if n:
            runs.append((first, n))
        if runs:
            guard.start_copies([i for f, k in runs for i in range(f, f + k)])
        return runs

    def copy_runs(self, src: Store, dst: Store, runs: list[tuple[int, int]],
                  write_back: bool = False, restore: Restore | None = None) -> int:
        """Copy runs taken by ``take_runs``; no lock held (they are in flight).

        A local destination starts writing each run back as soon as it is
        copied, so the disk works while the job copies on (and the pages
        are still hot).  With ``write_back`` (the host is busy), local ends
        are also fdatasync'ed here, in the copy's own thread: the clears
        need no other fdatasync (``finish_runs(durable=True)``), so host
        writes waiting for a commit of their map bits do not wait for the
        job's megabytes to reach the disk, and a write into an extent so
        copied has its protected bit committed alone (``copy_durable``)."""
        # A restore job's copy captures for the restore it was taken under
        # (an undo may replace it behind the gate before this thread runs).
        r = restore if restore is not None else self._restore
        if r is not None and dst is self.source.store:
            self.capture(r, [i for first, n in runs for i in range(first, first + n)])
        copied = 0
        for first, n in runs:
            copied += self.copy_extents(src, dst, first, n)
            start_writeback(dst, first << self.shift, n << self.shift)
        if write_back:
            for store in (dst, src):
                if is_local(store):
                    self.committer.sync_volume(store.fd)
        return copied

    def finish_runs(self, bm: Bitmap, runs: list[tuple[int, int]], dst: Store, copied: bool,
                    src: Store | None = None, durable: bool = False) -> None:
        """Under lock: the copy of runs taken together returned; release
        their extents (all at once: they share one in-flight event), and if
        it ``copied`` (and still counts) clear their bits (rule 2).  Both
        ends must be durable before the clear is committed: the copy may
        have read a host write to ``src`` that was never flushed, and a
        power cut would then take it from the source but not from the copy.
        They are already if the copy was ``durable`` (``copy_runs`` with
        ``write_back``); else the next commit fdatasyncs them first."""
        exts = [i for first, n in runs for i in range(first, first + n)]
        if copied and not self._on_failed_volume(dst, src):
            for i in exts:
                bm.clear(i)
            if not durable:
                self._copied_into(dst)
                if src is not None:
                    self._copied_into(src)
                r = self._restore
                if r is not None and bm is r.pending:
                    self._note_unsynced(r, exts)
        self.guard.end_copies(exts)

    def _note_unsynced(self, r: Restore, exts: list[int]) -> None:
        """Under lock: the job copied ``exts`` into the source, not yet durable."""
        synced = self.committer.synced_epoch
        if r.pruned_at != synced:
            r.unsynced = {i: e for i, e in r.unsynced.items() if e >= synced}
            r.pruned_at = synced
        epoch = self.committer.epoch
        for i in exts:
            r.unsynced[i] = epoch

    def copy_durable(self, r: Restore, i: int) -> bool:
        """Under lock: is every copy the job made into extent ``i`` durable?
        Then its protected bit, which stops the copy, may be committed
        without waiting for the full commit's fdatasync (SETS_STOP_COPIES).
        A copy on demand needs no answer: it protects its extent itself."""
        epoch = r.unsynced.get(i)
        return epoch is None or epoch < self.committer.synced_epoch


class CloneExport:
    """The policy of a clone's own export: writable only while fractured.
    A remote clone's export goes through its store for every request."""

    def __init__(self, family: Family, clone: Clone):
        self.family = family
        self.clone = clone
        self.plain_reads = is_local(clone.volume.store)

    def pread(self, vol: Volume, buf, offset: int) -> None:
        vol.store.pread(buf, offset)

    def _writable(self, offset: int, length: int) -> range:
        clone = self.clone
        with self.family.maps_lock:
            if clone.state != FRACTURED:
                raise ReadOnly(f"clone {clone.name} is {clone.state}: its export is "
                               "read-only until it is fractured")
            point = self.family.undo_point()
            if point is not None and point.clone is clone:  # the undo rebuilds from it
                raise ReadOnly(undo_refusal(self.family.source.name, clone.name))
            exts = extent_range(offset, length, self.family.shift)
            batches = [self.family.committer.request(clone.delta, i) for i in exts]
            if clone.fracturing is not None:  # a real difference, not a mirrored write
                clone.fracturing.update(exts)
        _wait(batches)
        return exts

    def pwrite(self, vol: Volume, buf, offset: int, fua: bool) -> None:
        self._writable(offset, len(buf))
        vol.store.pwrite(buf, offset)
        if fua:
            vol.store.flush()

    def trim(self, vol: Volume, count: int, offset: int, fua: bool) -> None:
        self.zero(vol, count, offset, fua)

    def zero(self, vol: Volume, count: int, offset: int, fua: bool,
             may_trim: bool = True, fast: bool = False) -> None:
        self._writable(offset, count)
        vol.store.zero(offset, count, may_trim)
        if fua:
            vol.store.flush()

    def extents(self, vol: Volume, count: int, offset: int,
                one: bool) -> list[tuple[int, int, bool]]:
        return vol.store.extents(offset, count, one)

    def flush(self, vol: Volume) -> None:
        vol.store.flush()


def undo_refusal(source: str, clone: str) -> str:
    """Why a change to ``clone`` is refused while it holds an undo point."""
    return (f"clone {clone} holds the undo point of {source}'s restore (the volume as it "
            f"was before it); 'lunclone restore forget {source}' drops it")


def _wait(batches: list[Batch | None]) -> None:
    seen: set[int] = set()
    for b in batches:
        if b is not None and id(b) not in seen:
            seen.add(id(b))
            b.wait()



def _runs_of(exts: list[int]) -> list[tuple[int, int]]:
    """(first, count) runs of consecutive extents, in order."""
    runs: list[tuple[int, int]] = []
    for i in sorted(exts):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _chunks(hot: set[int]) -> set[int]:
    """The intent chunks of the extents in ``hot``.  Fast-path writers add
    to the set without the lock: ``set.copy`` takes it in one C call."""
    return {i >> INTENT_CHUNK_SHIFT for i in hot.copy()}


def _all_copied(r: Restore, offset: int, length: int, shift: int) -> bool:
    """Without the lock: does the source already hold what a read of these
    bytes must return?  True when every extent is not pending, or is
    protected.  During a restore a pending bit is only cleared, and a
    protected bit only set, after the source holds the data (a copy ended,
    or a write covering the extent landed), and neither has a copy in
    flight; the restore's gate (``ready``) must be open, else the pending
    map may not be filled yet."""
    pend, prot = r.pending.bits, r.protected.bits
    for i in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
        byte, bit = i >> 3, i & 7
        if pend[byte] >> bit & 1 and not prot[byte] >> bit & 1:
            return False
    return True


def _set_bits_between(bm: Bitmap, first: int, last: int):
    for i in bm.iter_set(first):
        if i > last:
            return
        yield i


def _as_data(runs: list[tuple[int, int, bool]], data_extents: list[int],
             shift: int) -> list[tuple[int, int, bool]]:
    """``runs`` with the given extents turned from hole into data, merged."""
    marks: list[tuple[int, int]] = [(i << shift, (i + 1) << shift) for i in data_extents]
    out: list[tuple[int, int, bool]] = []

    def add(off: int, n: int, hole: bool) -> None:
        if n <= 0:
            return
        if out and out[-1][2] == hole and out[-1][0] + out[-1][1] == off:
            o, m, _ = out.pop()
            out.append((o, m + n, hole))
        else:
            out.append((off, n, hole))
    k = 0
    for off, n, hole in runs:
        end = off + n
        if not hole:
            add(off, n, False)
            continue
        pos = off
        while k < len(marks) and marks[k][1] <= pos:
            k += 1
        j = k
        while pos < end and j < len(marks) and marks[j][0] < end:
            a, b = max(marks[j][0], pos), min(marks[j][1], end)
            add(pos, a - pos, True)
            add(a, b - a, False)
            pos = b
            j += 1
        add(pos, end - pos, True)
    return out
