"""Admin commands on restores: start, finish, pause, resume, rate; a restore
resumed or refused at start-up.  Undo of a restore goes here.

What a restore means for a host request (pending, protected, copy on
demand) is ``policy.Restore`` and ``policy.Family``; the copy loop is
``jobs.RestoreJob``.  This module owns when a restore's state changes and
how that change is committed:

- start: the gate (``new_rules``) installs the restore with ``ready``
  clear, so new host requests wait at it, and waits for writes that decided
  under the old rules; then one transaction records the job, the pending
  map (the clone's delta map) and the other clones' grown delta maps.  If
  anything fails before COMMIT, the gate is undone: nothing changed.
- finish: pending is empty, no copy is in flight and no host read is
  taking data from the clone (after COMMIT the clone may be written or
  deleted); one transaction makes the clone's delta map the protected
  restore map and the clone fractured again (or synchronizing,
  if host writes were mirrored to it and may have been cut short).
- pause, resume, rate: the job record, then memory (``tx.then``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import shutil
import time
from typing import Awaitable, Callable

from . import faults, undo, units
from .bitmap import Bitmap, byte_ranges
from .clones import Clones
from .errors import Busy, InvalidArgument, LuncloneError, NotFound, WrongState
from .families import DRAIN_TIMEOUT, Families, new_rules
from .jobs import JobKey, JobRunner, RestoreJob
from .metadata import CAPTURED, DELTA, PENDING, PROTECTED, JobRecord
from .policy import DONE, FRACTURED, MIRRORED, PAUSED, RESTORING, RUNNING, SYNCHRONIZING
from .policy import Clone, Family, Restore
from .volumes import VolumeTable

log = logging.getLogger("lunclone.restores")


class Restores:
    def __init__(self, volumes: VolumeTable, families: Families, jobs: JobRunner,
                 admin: asyncio.Lock, clones: Clones, state_dir: str):
        self.state_dir = state_dir  # where the undo images are (undo.py)
        self.volumes = volumes
        self.families = families
        self.committer = families.committer
        self.md = self.committer.md
        self.maps_lock = self.committer.maps_lock
        self.jobs = jobs
        self.admin = admin
        self.clones = clones

    # -- start-up ----------------------------------------------------------------
    def load_all(self) -> None:
        for job in self.md.jobs():
            if job.kind in ("restore", "undo") and job.source in self.volumes.served:
                self.load(job)

    def load(self, job: JobRecord) -> None:
        """Resume a restore, or keep its source unserved if the clone it
        copies from is missing: serving the source would show pre-restore
        data in every pending extent."""
        fam = self.families.peek(job.source)  # a finished one's maps stay unloaded
        clone = fam.clones.get(job.clone) if fam is not None else None
        if job.state == DONE:
            if clone is not None:
                captured, store = self._load_undo(job, fam.nextents)
                fam.last_restore = self._done(clone, job, fam.nextents, captured, store)
            elif job.undo and not os.path.exists(undo.path(self.state_dir, job.source)):
                self._drop_missing_point(job)  # kept in the metadata only: as above
            return
        if clone is None:
            why = self.volumes.broken.get(job.clone, "is missing")
            msg = (f"its restore from {job.clone} cannot go on: {job.clone} {why}; bring it "
                   f"back, then run 'lunclone restore resume {job.source}'")
            log.error("volume %s not served: %s", job.source, msg)
            self.families.unserve(fam, job.source, msg)
            return
        if job.kind == "undo" and not os.path.exists(undo.path(self.state_dir, job.source)):
            msg = (f"its undo cannot go on: the undo image {undo.path(self.state_dir, job.source)} "
                   f"is missing; bring it back, then run 'lunclone restore resume {job.source}'")
            log.error("volume %s not served: %s", job.source, msg)
            self.families.unserve(fam, job.source, msg)
            return
        self.families.load_maps(fam)  # the restore's end reads every clone's map
        pending = self.md.load_bitmap(job.source, PENDING, fam.nextents)
        protected = self.md.load_bitmap(job.source, PROTECTED, fam.nextents)
        captured, store = self._load_undo(job, fam.nextents)
        if job.kind == "undo":
            r = Restore(clone, True, pending, protected, job.total_extents)
            r.kind = "undo"
            r.undo_from = undo.UndoSource(captured, store, clone.volume.store, fam.shift)
        else:
            r = Restore(clone, job.protected, pending, protected, job.total_extents,
                        captured, store)
        r.state, r.rate_limit, r.on_demand, r.error = job.state, job.rate_limit, job.on_demand, job.error
        r.progress.copied_bytes = job.copied_bytes
        r.ready.set()
        self.committer.register(pending)
        self.committer.register(protected)
        if r.captured is not None:
            self.committer.register(captured)
        fam.restore = r
        log.info("resuming restore of %s from %s: %d extents pending",
                 job.source, clone.name, pending.count())

    def _load_undo(self, job: JobRecord, nextents: int):
        """(captured map, open undo image) of a restore that keeps one, else
        (None, None); a missing image is logged, and there is no undo point."""
        if not job.undo:  # an image left by a crash (an undo's end, a failed start): no one's
            undo.remove(self.state_dir, job.source)
            return None, None
        store = undo.open_existing(self.state_dir, job.source)
        if store is None:
            self._drop_missing_point(job)
            return None, None
        return self.md.load_bitmap(job.source, CAPTURED, nextents), store

    def _drop_missing_point(self, job: JobRecord) -> None:
        """The undo image of ``job`` is missing: its point is dropped for
        good, so that no later image is paired with its captured map.  (The
        metadata alone: no map in memory holds it yet, and a caller may
        hold maps_lock, which comes after commit_lock.)"""
        log.error("restore of %s: its undo image %s is missing: its undo point is "
                  "dropped%s", job.source, undo.path(self.state_dir, job.source),
                  "" if job.state == DONE else "; the restore goes on without one")
        with self.md.transaction() as tx:
            tx.delete_bitmap(job.source, CAPTURED)
            tx.put_job(dataclasses.replace(job, undo=False))

    @staticmethod
    def _done(clone: Clone, job: JobRecord, nextents: int,
              captured: Bitmap | None = None, store=None) -> Restore:
        """A finished restore, for status: of its protected map, the count
        (the clone's delta map, for one finished before schema version 4:
        it has grown since)."""
        protected = (clone.delta.copy() if job.protected_extents is None
                     else Bitmap.unloaded(nextents, None, job.protected_extents))
        r = Restore(clone, job.protected, Bitmap(nextents), protected, job.total_extents,
                    captured, store)
        r.state, r.on_demand, r.kind = DONE, job.on_demand, job.kind
        r.progress.copied_bytes = job.copied_bytes
        return r

    def start(self) -> None:
        """On the loop: resume every unfinished restore's job."""
        for fam in self.families.by_source.values():
            if fam.restore is not None:
                self._run_job(fam)

    # -- start -----------------------------------------------------------------------
    async def begin(self, source: str, clone_name: str, protected: bool = True,
                    rate_limit=0, keep_undo: bool = False, force: bool = False) -> None:
        """Start a restore.  ``keep_undo`` (protected restores only: an
        unprotected one writes the clone, which the undo image relies on)
        keeps the source's pre-restore data as the restore overwrites it
        (``undo.py``).  The start drops the source's last undo point, if
        any, in its own transaction.  (Off by default until ``restore
        undo`` exists: until then the image costs a second copy and gives
        nothing but the rebuilt pre-restore image, by hand.)"""
        async with self.admin:
            units.check_name(source)
            rate_limit = units.parse_size(rate_limit or 0)
            src = self.volumes.get(source)
            fam, clone = self.families.find_clone(clone_name)
            self._check_can_start(fam, clone, source)
            dropping = self._check_undo(fam, source, protected, keep_undo, force)
            if dropping is not None:
                log.warning("restore of %s: dropping the undo point of its restore from %s "
                            "(--force)", source, dropping)
            old_state = clone.state
            r = Restore(clone, protected, Bitmap(fam.nextents, key=(source, PENDING)),
                        Bitmap(fam.nextents, key=(source, PROTECTED)), 0)
            r.rate_limit = rate_limit
            # Before the gate closes (host requests must not wait for a sync
            # copy); from the install on, no sync job starts (``start_sync``).
            await self._end_syncs(fam, clone)
            made = False
            if keep_undo:  # (no await from here to the try)
                made = not os.path.exists(undo.path(self.state_dir, source))
                r.undo_store = undo.open_or_create(self.state_dir, source, src.size)
                r.captured = Bitmap(fam.nextents, key=(source, CAPTURED))
            store = r.undo_store

            def failed() -> None:
                if store is not None:  # the last undo point, if any, is intact
                    undo.close(self.committer, store)
                    if made:
                        undo.remove(self.state_dir, source)
            await self._start(fam, r, old_state, functools.partial(self._commit_start, fam, r),
                              failed)
            log.info("restore of %s from %s started: %d extents to copy (%s)", source,
                     clone_name, r.total_extents, "protected" if protected else "unprotected")
            self._run_job(fam)

    async def _start(self, fam: Family, r: Restore, old_state: str, commit: Callable[[], None],
                     failed: Callable[[], None] | None = None,
                     before_commit: Callable[[], Awaitable[None]] | None = None) -> None:
        """Install restore ``r`` behind the gate (``new_rules``: new host
        requests wait at it), wait for the writes decided under the old
        rules, and ``commit`` its start in one transaction.  If anything
        fails before COMMIT, the install is undone (only the restore and
        its clone's state changed: other clones may have changed state
        meanwhile and are left alone), the sync jobs stopped for the start
        go on, ``failed`` runs, and the error is raised.  The gate opens
        either way: requests go on under the new rules, or the old.
        ``before_commit`` runs behind the gate, once the old writes are
        done (an undo of a running restore ends that restore's copies)."""
        clone = r.clone
        previous = fam.restore  # a running restore an undo replaces, else None

        def install():
            fam.restore = r
            clone.state = RESTORING
            return (clone.volume.barrier.switch(), *fam.switch_fast())

        def uninstall():
            fam.restore = previous
            clone.state = old_state
        try:
            async with new_rules(fam, fam.source.name, install, uninstall):
                await self._writers_end(fam)
                if before_commit is not None:
                    await before_commit()
                if faults.armed is not None:
                    faults.hit(f"{r.kind}.gated")
                commit()
        except BaseException:
            for other in list(fam.clones.values()):  # the start changed nothing
                if other.state == SYNCHRONIZING:
                    self.clones.start_sync(fam, other)
            if failed is not None:
                failed()
            raise
        finally:
            r.ready.set()
            with self.maps_lock:
                fam.refresh_fast()

    async def plan(self, source: str, clone_name: str, protected: bool = True,
                   rate_limit=0, keep_undo: bool = False, force: bool = False) -> dict:
        """What ``begin`` would do, changing nothing (``restore --dry-run``):
        the same checks, then the extents it would copy (the clone's delta
        map) and their bytes; with ``keep_undo`` the undo image needs at
        most as many (whole extents, sparse where the source has holes),
        beside the space free where it would be."""
        async with self.admin:
            units.check_name(source)
            units.parse_size(rate_limit or 0)
            src = self.volumes.get(source)
            fam, clone = self.families.find_clone(clone_name)
            self._check_can_start(fam, clone, source)
            self._check_undo(fam, source, protected, keep_undo, force)
            with self.maps_lock:
                differs = clone.delta.copy()
            copied = sum(n for _, n in byte_ranges(differs, src.extent_size, src.size))
            return {"source": source, "from": clone_name, "protected": protected,
                    "extents": differs.count(), "bytes": copied,
                    "undo_bytes": copied if keep_undo else 0,
                    "free_bytes": shutil.disk_usage(self.state_dir).free}

    def _check_undo(self, fam: Family, source: str, protected: bool, keep_undo: bool,
                    force: bool) -> str | None:
        """The clone of the undo point a new restore would drop (refused
        without ``force``; one in the metadata only counts too: its clone's
        file may come back), and ``--undo`` only with a protected restore."""
        point = fam.undo_point()
        stored = undo.stored_point(self.committer, source=source) if point is None else None
        clone = point.clone.name if point is not None else stored.clone if stored else None
        if clone is not None and not force:
            raise WrongState(f"{source} has an undo point (its restore from "
                             f"{clone}); a new restore would drop it: "
                             f"'lunclone restore forget {source}' first, or --force")
        if keep_undo and not protected:
            raise InvalidArgument("--undo needs a protected restore: an unprotected one "
                                  "writes the clone, which the undo image relies on")
        return clone

    @staticmethod
    def _check_can_start(fam: Family, clone: Clone, source: str) -> None:
        if fam.source.name != source:
            raise InvalidArgument(f"{clone.name} is a clone of {fam.source.name}, not of {source}")
        if fam.restore is not None:
            raise WrongState(f"{source} is already being restored from {fam.restore.clone.name}; "
                             f"see 'lunclone status {source}'")
        if clone.state != FRACTURED:
            raise WrongState(f"clone {clone.name} is {clone.state}; only a fractured clone (a "
                             "point-in-time copy) can be restored: "
                             f"'lunclone clone fracture {clone.name}'")

    async def _end_syncs(self, fam: Family, restored: Clone) -> None:
        """Stop the sync jobs of the clones the start will fracture, and wait
        until their copies have landed: a copy landing after the start would
        change a clone that is a point-in-time copy from then on.  (No await
        follows the last look until the restore is installed, so none
        starts again; one may start while another is awaited: look again.)"""
        while True:
            keys = [JobKey("sync", c.name) for c in fam.clones.values() if c is not restored]
            keys = [k for k in keys if self.jobs.get(k) is not None]
            if not keys:
                return
            for key in keys:
                self.jobs.get(key).stopped = True
                await self.jobs.end(key)

    @staticmethod
    async def _writers_end(fam: Family) -> None:
        """Slow-path writes decided under the old rules are registered
        writers; new ones wait at the gate (``Restore.ready``)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while not fam.guard.no_writers():
            if time.monotonic() > deadline:
                raise Busy(f"host writes to {fam.source.name} did not finish; try again")
            await asyncio.sleep(0.0005)

    def _commit_start(self, fam: Family, r: Restore) -> None:
        clone = r.clone
        with self.committer.transaction() as tx:
            r.pending.assign(clone.delta)
            r.total_extents = r.pending.count()
            self.clones.set_state(clone, RESTORING, tx)
            self._others_fractured(fam, r, tx)
            tx.delete_bitmap(fam.source.name, CAPTURED)
            self._record_start(fam, r, tx)
            if r.captured is not None:
                tx.then(functools.partial(self.committer.register, r.captured))
        self._replace_undo_point(fam, r)

    def _others_fractured(self, fam: Family, r: Restore, tx) -> None:
        """In the start's transaction: the source is about to change in the
        pending extents, so every other clone is fractured and those extents
        join its delta map."""
        for other in fam.clones.values():
            if other is r.clone:
                continue
            if other.state in MIRRORED:
                self.clones.set_state(other, FRACTURED, tx)
            # Stored: delta | pending.  Only the pages the union changes,
            # and those changed in memory but not stored yet, can
            # differ from the stored map (no commit runs meanwhile).
            grown = other.delta.union_pages(r.pending)
            for p in sorted(grown.keys() | other.delta.dirty_pages):
                tx.save_page(other.name, DELTA, p, grown.get(p) or other.delta.page(p))
            tx.then(functools.partial(_put_pages, other.delta, grown))
        # A clone not loaded (away: ``Families.distrust_absent`` made its
        # map full) must not come back as a mirror of pre-restore data.
        for rec in self.volumes.records.values():
            if (rec.source == fam.source.name and rec.name not in fam.clones
                    and rec.clone_state in MIRRORED):
                tx.put_volume(dataclasses.replace(rec, clone_state=FRACTURED))
                tx.then(functools.partial(setattr, rec, "clone_state", FRACTURED))

    def _record_start(self, fam: Family, r: Restore, tx) -> None:
        """In the start's transaction: the new pending map, an empty
        protected map and the job; the maps registered once committed."""
        tx.delete_bitmap(fam.source.name, PENDING)
        tx.delete_bitmap(fam.source.name, PROTECTED)
        tx.save_bitmap(fam.source.name, PENDING, r.pending)
        tx.put_job(self._record(fam, r))
        tx.then(functools.partial(self.committer.register, r.pending))
        tx.then(functools.partial(self.committer.register, r.protected))

    def _replace_undo_point(self, fam: Family, r: Restore) -> None:
        """The start has committed: the last restore's undo point is gone
        from the metadata (the start deleted its captured map and rewrote
        the job row).  Its open image is closed, and its blocks freed (the
        new restore captures into the same file: nothing in it is trusted
        now) or the file removed (--no-undo).  Before the gate opens, so
        before any capture."""
        last = fam.last_restore
        if last is not None and last.undo_store is not None:
            undo.close(self.committer, last.undo_store)
            last.captured = last.undo_store = None
        try:  # (an error here is no failed start: it has committed)
            if r.undo_store is not None:
                undo.empty(r.undo_store)
            else:
                undo.remove(self.state_dir, fam.source.name)
        except Exception as e:  # only space is at stake
            log.warning("restore of %s: the last undo image was not freed: %s",
                        fam.source.name, e)

    def _record(self, fam: Family, r: Restore) -> JobRecord:
        return JobRecord(fam.source.name, r.kind, r.clone.name, r.state, r.protected_mode,
                         r.total_extents, r.progress.copied_bytes, r.on_demand, r.rate_limit,
                         r.error, time.time(), r.captured is not None or r.undo_from is not None)

    def _run_job(self, fam: Family) -> None:
        job = RestoreJob(fam, fam.restore, self.jobs.pool, self.finish, self.pause_with_error)
        self.jobs.run(JobKey("restore", fam.source.name), job)

    # -- finish ----------------------------------------------------------------------
    def finish(self, fam: Family) -> bool:
        """Pending is empty: in one transaction the clone's delta map becomes
        the protected restore map, and the clone goes back to fractured
        (``--unprotected``, or a restore whose mirror failed: synchronizing,
        so the protected extents are copied to it)."""
        r = fam.restore
        if faults.armed is not None:
            faults.hit("restore.finish")
        with self.committer.transaction() as tx:
            if (r is None or r.pending.any() or fam.guard.copying()
                    or fam.guard.reading_clone()
                    or self.committer.has_requests(r.protected)):
                return False
            clone = r.clone
            # The protected map is exactly what the host changed; with
            # --unprotected those writes were mirrored, but a crash may have
            # cut one short, so the clone resynchronizes them (cheaply).
            # An undo: the clone's delta map is the first restore's pending
            # set (``undo_begin``), and the host's writes join it.
            delta = r.protected.copy(clone.delta.key)
            if r.kind == "undo":
                delta.union(clone.delta)
                tx.delete_bitmap(fam.source.name, CAPTURED)
            tx.replace_bitmap(clone.name, DELTA, delta)
            self.clones.set_state(clone, FRACTURED if r.protected_mode else SYNCHRONIZING, tx)
            tx.delete_bitmap(fam.source.name, PENDING)
            tx.delete_bitmap(fam.source.name, PROTECTED)
            tx.put_job(dataclasses.replace(self._record(fam, r), state=DONE,
                                           undo=r.captured is not None,
                                           protected_extents=r.protected.count()))
            image = r.undo_from.image if r.undo_from is not None else None

            def done() -> None:
                clone.delta.assign(delta)
                r.state = DONE
                self.committer.unregister(r.pending)
                self.committer.unregister(r.protected)
                if r.captured is not None:
                    self.committer.unregister(r.captured)
                if image is not None:  # under commit_lock and maps_lock (``forget_fd``)
                    r.undo_from = None
                    self.committer.forget_fd(image.fd)
                    image.close()  # (its fd number -1: never closed twice)
                fam.restore = None
                fam.last_restore = r
            tx.then(done)
        if image is not None:
            undo.remove(self.state_dir, fam.source.name)
        log.info("restore of %s from %s done: %d bytes copied, %d on demand, %d protected",
                 fam.source.name, clone.name, r.progress.copied_bytes, r.on_demand,
                 r.protected.count())
        if clone.state == SYNCHRONIZING:
            self.clones.start_sync(fam, clone)
        return True

    # -- the undo point ------------------------------------------------------------------
    async def forget(self, source: str) -> None:
        """Drop the undo point of the source's finished restore."""
        async with self.admin:
            units.check_name(source)
            self.volumes.get(source)
            fam = self.families.get(source)
            point = fam.undo_point() if fam is not None else None
            if point is None:
                self._forget_stored(source)
                return
            if point is fam.restore:
                raise WrongState(f"the restore of {source} is {point.state}; its undo point "
                                 "can be dropped once it is done")
            undo.forget(self.committer, self.state_dir, source, point)
            log.info("undo point of %s dropped", source)

    def _forget_stored(self, source: str) -> None:
        """``forget`` of a point kept in the metadata only (its clone's file
        was missing at start-up), else NotFound."""
        job = undo.stored_point(self.committer, source=source)
        if job is None:
            raise NotFound(f"{source} has no undo point")
        with self.committer.transaction() as tx:
            undo.forget_stored_point(job, tx)
        undo.remove(self.state_dir, source)
        log.info("undo point of %s dropped (its clone %s was not loaded)", source, job.clone)

    async def undo_begin(self, source: str, rate_limit=0) -> None:
        """``restore undo``: an instant protected restore of the source back
        to the pre-restore image of its finished restore (the undo point):
        the undo image where captured, the clone everywhere else
        (``undo.UndoSource``).  It copies what may differ from that image:
        the captured extents (the first restore's pending set) and the
        clone's delta map (what the host wrote since that restore began).
        In the same transaction the clone's delta map becomes the first
        restore's pending set: what differed before it; ``finish`` adds the
        host's writes during the undo.  The point is used up by the undo.

        While that restore still runs (or is paused), its job is stopped
        first (host I/O goes on under it meanwhile), then it is replaced
        behind the gate: its copies on demand land, its bits are committed
        (``_end_first``), and one transaction ends it and starts the undo
        (``_commit_undo_switch``).  If that fails, it goes on."""
        async with self.admin:
            units.check_name(source)
            rate_limit = units.parse_size(rate_limit or 0)
            self.volumes.get(source)
            fam = self.families.get(source)
            point = fam.undo_point() if fam is not None else None
            if point is None and fam is not None and fam.restore is not None \
                    and fam.restore.kind == "undo":
                raise WrongState(f"the undo of {source} is {fam.restore.state} already; see "
                                 f"'lunclone status {source}'")
            if point is None:
                stored = undo.stored_point(self.committer, source=source)
                if stored is not None:  # its clone was not loaded
                    raise WrongState(
                        f"the undo point of {source} needs clone {stored.clone}, which is not "
                        f"served ({self.volumes.error_of(stored.clone)}); bring it back and "
                        "restart the daemon")
                raise NotFound(f"{source} has no undo point: only a restore started with "
                               "--undo keeps one")
            clone = point.clone
            await self._end_syncs(fam, clone)
            if point is fam.restore:  # its job stops (it may finish the restore first)
                await self._stop_job(fam)
            running = point is fam.restore  # (looked at after the last await)
            if not running and clone.state != FRACTURED:  # the point's refusals keep it so
                raise WrongState(f"clone {clone.name} is {clone.state}; cannot undo from it")
            r = Restore(clone, True, Bitmap(fam.nextents, key=(source, PENDING)),
                        Bitmap(fam.nextents, key=(source, PROTECTED)), 0)
            r.kind, r.rate_limit = "undo", rate_limit
            r.undo_from = undo.UndoSource(point.captured, point.undo_store,
                                          clone.volume.store, fam.shift)
            if running:
                await self._start(fam, r, RESTORING,
                                  functools.partial(self._commit_undo_switch, fam, r, point),
                                  failed=functools.partial(self._run_job, fam),
                                  before_commit=functools.partial(self._end_first, fam, point))
            else:
                await self._start(fam, r, FRACTURED,
                                  functools.partial(self._commit_undo_start, fam, r, point))
            log.info("undo of the restore of %s from %s started: %d extents to copy", source,
                     clone.name, r.total_extents)
            self._run_job(fam)

    async def _stop_job(self, fam: Family) -> None:
        """Stop the restore job of the family and wait until its copies have
        landed (before a gate: host requests never wait for a job's copy)."""
        key = JobKey("restore", fam.source.name)
        job = self.jobs.get(key)
        if job is not None:
            job.stopped = True
            await self.jobs.end(key)

    async def _end_first(self, fam: Family, first: Restore) -> None:
        """Behind the gate of an undo of running restore ``first`` (its job
        stopped already): every copy on demand decided under it lands, and
        its bits requested or set until a flush are committed, so that
        nothing of it is still moving when one transaction replaces it."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while fam.guard.copying():
            if time.monotonic() > deadline:
                raise Busy(f"copies of the restore of {fam.source.name} did not finish; "
                           "try again")
            await asyncio.sleep(0.0005)
        self.committer.commit_now()
        with self.maps_lock:
            left = any(self.committer.has_requests(bm)
                       for bm in (first.pending, first.protected, first.captured))
        if left:
            raise Busy(f"the restore of {fam.source.name} is still committing; try again")

    def _commit_undo_switch(self, fam: Family, r: Restore, first: Restore) -> None:
        """One transaction: running restore ``first`` ends, undo ``r`` starts.
        What may differ from the pre-restore image: the captured extents and
        the extents the host wrote during ``first`` (its protected map);
        an extent still pending and never captured holds its pre-restore
        data.  The clone's delta map is still ``first``'s pending set as it
        started (a restoring clone's map does not change): what differed
        before it, as the undo's end needs (``finish``)."""
        with self.committer.transaction() as tx:
            r.pending.assign(first.protected)
            r.pending.union(first.captured)
            r.total_extents = r.pending.count()
            self._others_fractured(fam, r, tx)
            self._record_start(fam, r, tx)

            def switched() -> None:
                for bm in (first.pending, first.protected, first.captured):
                    self.committer.unregister(bm)
                first.captured = first.undo_store = None  # the undo's now (``undo_from``)
            tx.then(switched)

    def _commit_undo_start(self, fam: Family, r: Restore, point: Restore) -> None:
        clone, captured = r.clone, point.captured
        with self.committer.transaction() as tx:
            r.pending.assign(clone.delta)
            r.pending.union(captured)
            r.total_extents = r.pending.count()
            before = captured.copy(clone.delta.key)  # what differed before the first restore
            tx.replace_bitmap(clone.name, DELTA, before)
            self.clones.set_state(clone, RESTORING, tx)
            self._others_fractured(fam, r, tx)
            self._record_start(fam, r, tx)

            def started() -> None:
                clone.delta.assign(before)
                point.captured = point.undo_store = None  # the undo's now (``undo_from``)
            tx.then(started)

    # -- pause, resume, rate -----------------------------------------------------------
    def _restore_of(self, source: str) -> tuple[Family, Restore]:
        units.check_name(source)
        self.volumes.get(source)
        fam = self.families.get(source)
        if fam is None or fam.restore is None:
            raise NotFound(f"no restore of {source} is in progress")
        return fam, fam.restore

    def _persist(self, fam: Family, r: Restore, **changes) -> None:
        """Record the job with ``changes``; apply them to ``r`` once committed."""
        with self.committer.transaction() as tx:
            tx.put_job(dataclasses.replace(self._record(fam, r), **changes))
            tx.then(lambda: [setattr(r, k, v) for k, v in changes.items()])

    async def pause(self, source: str) -> None:
        async with self.admin:
            fam, r = self._restore_of(source)
            self._persist(fam, r, state=PAUSED)

    def pause_with_error(self, fam: Family, r: Restore, message: str | None) -> None:
        """Pause restore ``r`` in memory at once (the job stops retrying);
        persist if the metadata can take it (on a full disk it may not:
        after a restart the job then runs again).  Nothing if ``r`` is no
        longer the family's restore (an undo replaced it: its job's last
        copy failed after the install)."""
        if fam.restore is not r:
            return
        r.state, r.error = PAUSED, message
        try:
            self._persist(fam, r)
        except LuncloneError as e:
            log.error("could not record the pause of %s: %s", fam.source.name, e.message)
        log.error("restore of %s paused: %s; 'lunclone restore resume %s' goes on",
                  fam.source.name, message, fam.source.name)

    async def resume(self, source: str) -> None:
        async with self.admin:
            units.check_name(source)
            if source in self.volumes.broken and source in self.volumes.records:
                self._bring_back(source)
                fam = self.families.peek(source)
                if fam is None or fam.restore is None:
                    return  # served again, with no restore to go on with: done
            fam, r = self._restore_of(source)
            self._persist(fam, r, state=RUNNING, error=None)
            if not self.jobs.running(JobKey("restore", source)):
                self._run_job(fam)

    def _bring_back(self, source: str) -> None:
        """A source kept unserved because its restore's clone was missing:
        open it again, then (only if it is served) its clones, its family
        and its restore.  A clone is never served without its family's
        rules: with none, a client's writes to it would be in no delta map.
        A clone named here is refused; it comes back with its source."""
        vols = self.volumes
        if vols.records[source].source is not None:
            raise NotFound(f"volume {source!r} is not served: {vols.broken[source]}")
        clones = [rec.name for rec in vols.clones_of(source) if rec.name in vols.broken]
        job = next((j for j in self.md.jobs() if j.source == source), None)
        # Under the maps lock, which opening an export takes: no client can
        # open (and write to) a volume before its rules are in place.
        with self.maps_lock:
            vols.serve_again(source)
            if source not in vols.served:
                raise NotFound(f"volume {source!r} is not served: {vols.broken[source]}")
            try:
                for name in clones:
                    vols.serve_again(name)
                self.families.load(source)
                if job is not None and job.kind in ("restore", "undo"):
                    self.load(job)
                if source in vols.served:  # those still away miss the writes to come
                    self.families.distrust_absent([n for n in clones if n in vols.broken])
            except BaseException as e:  # (a full disk): no client has opened it yet
                self._unserve_again(source, f"serving it again failed: {e}")
                raise
        if source in vols.broken:
            raise NotFound(f"volume {source!r} is not served: {vols.broken[source]}")
        fam = self.families.get(source)
        if fam is not None:
            self.clones.resume_syncs(fam)
        log.info("volume %s is served again", source)

    def _unserve_again(self, source: str, why: str) -> None:
        """Under the maps lock: ``_bring_back`` failed half-way; the source
        and every clone of it go back to unserved (those opened again
        before the family failed to load too: served with no family, a
        client's writes to one would be in no delta map), the maps it
        loaded unregistered."""
        fam = self.families.peek(source)
        r = fam.restore if fam is not None else None
        if r is not None:
            for bm in (r.pending, r.protected, r.captured):
                if bm is not None:
                    self.committer.unregister(bm)
            fam.restore = None
        self.families.unserve(fam, source, why)
        for rec in self.volumes.clones_of(source):  # those opened before the family held them
            if rec.name in self.volumes.served:
                self.volumes.unserve(rec.name, f"its source {source!r} is not served")

    async def set_rate(self, source: str, limit) -> None:
        async with self.admin:
            fam, r = self._restore_of(source)
            limit = units.parse_size(limit)
            if limit < 0:
                raise InvalidArgument("rate must be 0 (unlimited) or a positive number of bytes/s")
            self._persist(fam, r, rate_limit=limit)
            job = self.jobs.get(JobKey("restore", source))
            if job is not None:
                job.throttle.set(limit)


def _put_pages(bm: Bitmap, pages: dict[int, bytes]) -> None:
    """Pages just stored (``Bitmap.union_pages``) become the map's."""
    for p, data in pages.items():
        bm.load_page(p, data)
