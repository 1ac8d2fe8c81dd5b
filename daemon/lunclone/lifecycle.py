"""Admin operations on clones and restores, each one metadata transaction.

Runs on the asyncio thread (control server) and at start-up.  Every state
change of the diagram in docs/DESIGN.md happens here; what a state means for a
host request is in ``policy``.

Ordering rules for a change:
- Admin commands run one at a time (``Lifecycle.admin``, an asyncio lock)
  and never block the loop: a host write they wait for may itself wait for
  a copy whose end runs on the loop.
- A change that makes host writes follow new rules first installs the new
  state under the lock, then waits (``iopath.quiesce``) for writes that
  decided under the old rules (a ``WriteBarrier`` generation, or
  ``Family.writers``), and only then scans or copies maps.  If that wait
  fails, the old state is put back: the command changed nothing.
- The database is changed in ``Committer.transaction()``; the in-memory
  state follows with ``tx.then`` after COMMIT, so a failed commit leaves
  memory as the database is.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from typing import TYPE_CHECKING

from . import faults, units
from . import volume as vf
from .bitmap import Bitmap
from .errors import AlreadyExists, Busy, InvalidArgument, LuncloneError, NotFound
from .iopath import Volume, quiesce
from .jobs import RestoreJob, SyncJob, is_running
from .metadata import JobRecord, VolumeRecord
from .policy import (DONE, FRACTURED, MIRRORED, PAUSED, RESTORING, RUNNING, SYNCHRONIZED,
                     SYNCHRONIZING, Clone, CloneExport, Family, Restore)
from .store import FileStore, Store, is_local

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("lunclone.lifecycle")

MAX_CLONES = 8
DRAIN_TIMEOUT = 60.0
INTENT_SWEEP_S = 3.0


class Lifecycle:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.committer = engine.committer
        self.lock = engine.maps_lock
        self.families: dict[str, Family] = {}
        self.jobs: dict[str, object] = {}
        # Copies of local files are bound by the disk; copies to or from a
        # remote clone mostly wait on the network: a few threads each.
        self.pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="lunclone-copy")
        self.admin = asyncio.Lock()  # one admin command at a time

    # -- loading ---------------------------------------------------------
    def load(self) -> None:
        """Rebuild families, maps and jobs from the metadata (start-up)."""
        eng = self.engine
        for rec in eng.records.values():
            if rec.source is None and rec.name in eng.volumes:
                self._load_family(rec.name)
            elif rec.source is not None and rec.name in eng.volumes \
                    and rec.source not in eng.volumes:
                eng.broken[rec.name] = f"its source {rec.source!r} is not served"
        for job in eng.md.jobs():
            if job.kind == "restore" and job.source in eng.volumes:
                self._load_restore(job)

    def _load_family(self, source: str) -> None:
        """A served source's clones (those whose volume could be opened)."""
        eng = self.engine
        clones = [r for r in eng.records.values() if r.source == source and r.name in eng.volumes]
        if not clones:
            return
        fam = self._family(eng.volumes[source])
        for rec in clones:
            delta = eng.md.load_bitmap(rec.name, "delta", fam.nextents)
            clone = Clone(rec.name, eng.volumes[rec.name], rec.clone_state, delta)
            self.committer.register(delta)
            fam.add_clone(clone)
            clone.volume.set_policy(CloneExport(fam, clone))

    def _load_restore(self, job: JobRecord) -> None:
        """Resume a restore, or keep its source unserved if the clone it
        copies from is missing: serving the source would show pre-restore
        data in every pending extent."""
        eng = self.engine
        fam = self.families.get(job.source)
        clone = fam.clones.get(job.clone) if fam is not None else None
        if job.state == DONE:
            if clone is not None:
                fam.last_restore = self._done_restore(clone, job, fam.nextents)
            return
        if clone is None:
            self._refuse_family(fam, job)
            return
        pending = eng.md.load_bitmap(job.source, "pending", fam.nextents)
        protected = eng.md.load_bitmap(job.source, "protected", fam.nextents)
        r = Restore(clone, job.protected, pending, protected, job.total_extents)
        r.state, r.rate_limit, r.on_demand, r.error = job.state, job.rate_limit, job.on_demand, job.error
        r.progress.copied_bytes = job.copied_bytes
        r.ready.set()
        self.committer.register(pending)
        self.committer.register(protected)
        fam.restore = r
        log.info("resuming restore of %s from %s: %d extents pending",
                 job.source, clone.name, pending.count())

    def _refuse_family(self, fam: Family | None, job: JobRecord) -> None:
        """The clone of an unfinished restore cannot be opened: neither the
        source nor its other clones are served until it is back."""
        eng = self.engine
        why = eng.broken.get(job.clone, "is missing")
        msg = (f"its restore from {job.clone} cannot go on: {job.clone} {why}; bring it "
               f"back, then run 'lunclone restore resume {job.source}'")
        log.error("volume %s not served: %s", job.source, msg)
        if fam is not None:
            for clone in list(fam.clones.values()):
                self.committer.unregister(clone.delta)
                eng.unserve(clone.name, f"its source {job.source!r} is not served")
            del self.families[job.source]
        eng.unserve(job.source, msg)

    @staticmethod
    def _done_restore(clone: Clone, job: JobRecord, nextents: int) -> Restore:
        """A finished restore, for status: its protected map was the clone's
        delta map at completion."""
        r = Restore(clone, job.protected, Bitmap(nextents), clone.delta.copy(), job.total_extents)
        r.state, r.on_demand = DONE, job.on_demand
        r.progress.copied_bytes = job.copied_bytes
        return r

    def start_jobs(self) -> None:
        """On the loop: resume every unfinished job.  A synchronized clone
        with write-intent bits set may differ where a mirrored write was cut
        short by a crash: it resynchronizes those extents."""
        for fam in self.families.values():
            for clone in fam.clones.values():
                if clone.state == SYNCHRONIZED and clone.delta.any():
                    with self.committer.transaction() as tx:
                        self._set_state(fam, clone, SYNCHRONIZING, tx)
                if clone.state == SYNCHRONIZING:
                    self._start_sync(fam, clone)
            if fam.restore is not None:
                self._start_restore_job(fam)
        self._sweeper = self.engine.loop.create_task(self._sweep_intents())

    async def _sweep_intents(self) -> None:
        """Clear idle write-intent bits of synchronized clones, every few
        seconds: pick the idle bits, flush a remote clone (a local one is
        fdatasync'ed by the commit), then clear what stayed idle."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(INTENT_SWEEP_S)
            for fam in list(self.families.values()):
                for clone in list(fam.clones.values()):
                    with self.lock:
                        idle = fam.idle_intents(clone)
                    if not idle:
                        continue
                    store = clone.volume.store
                    if not is_local(store):
                        try:
                            await loop.run_in_executor(self.pool, store.sweep_flush)
                        except OSError as e:  # mirrored writes may be lost: re-copy
                            fam.mirror_broken(clone, "flush", e)
                            continue
                    with self.lock:
                        fam.clear_intents(clone, idle)

    def _family(self, src: Volume) -> Family:
        fam = self.families.get(src.name)
        if fam is None:
            fam = Family(src, self.committer, self.lock, on_mirror_failed=self._mirror_failed)
            self.families[src.name] = fam
            src.set_policy(fam)
        return fam

    # -- clones ------------------------------------------------------------
    async def create_clone(self, source: str, name: str, remote: str | None = None) -> dict:
        async with self.admin:
            eng = self.engine
            units.check_name(name)
            src = eng.get_volume(source)
            src_rec = eng.records[source]
            if src_rec.source is not None:
                raise InvalidArgument(f"{source!r} is a clone; clone its source {src_rec.source!r}")
            if name in eng.records:
                raise AlreadyExists(f"a volume named {name!r} exists already")
            fam = self.families.get(source)
            if fam is not None and fam.restore is not None:
                raise Busy(f"{source} is being restored; create the clone after the restore")
            if fam is not None and len(fam.clones) >= MAX_CLONES:
                raise Busy(f"{source} has {MAX_CLONES} clones already, the most a volume may "
                           "have; delete one first")
            if remote:
                store = await self.engine.loop.run_in_executor(
                    self.pool, eng.open_remote, name, remote, src.size)
            else:
                store = self._new_local_store(name, src.size)
            try:
                await self._add_clone(src, name, store, remote)
            except BaseException:
                store.close()
                if store.path:
                    vf.remove(store.path)
                raise
            return eng.describe(name)

    def _new_local_store(self, name: str, size: int) -> FileStore:
        path = self.engine.volume_path(name)
        if os.path.exists(path):
            raise AlreadyExists(f"{path} exists but is not a known volume; move it away")
        try:
            vf.create_sparse(path, size)
        except OSError as e:
            raise vf.no_space_guard(e) from e
        return FileStore(path)

    async def _add_clone(self, src: Volume, name: str, store: Store, remote: str | None) -> None:
        eng = self.engine
        vol = Volume(name, store, src.size, src.extent_size)
        fam = self._family(src)
        delta = Bitmap(fam.nextents, key=(name, "delta"))
        clone = Clone(name, vol, SYNCHRONIZING, delta)
        vol.set_policy(CloneExport(fam, clone))
        rec = VolumeRecord(name, src.size, src.extent_size, source=src.name,
                           clone_state=SYNCHRONIZING, remote=remote, created=time.time())
        with self.lock:
            # Registered before any write can set a bit: a bit committed by
            # the group commit is then saved with its page.
            self.committer.register(delta)
            fam.add_clone(clone)  # from now on host writes set its delta bits
            older_writes = src.barrier.switch()
        try:
            await quiesce(older_writes, DRAIN_TIMEOUT, src.name)
            differ = self._initial_delta(fam, store)
            with self.committer.transaction() as tx:
                new_delta = delta.copy(delta.key)
                new_delta.union(differ)
                tx.delete_bitmap(name, "delta")  # rows a failed create may have left
                tx.put_volume(rec)
                tx.replace_bitmap(name, "delta", new_delta)
                tx.then(lambda: delta.union(differ))
        except BaseException:
            with self.lock:
                fam.remove_clone(name)
                self.committer.unregister(delta)
            await self._drop_family_if_unused(fam)
            raise
        eng.records[name] = rec
        eng.volumes[name] = vol
        log.info("clone %s of %s created%s: %d extents to copy", name, src.name,
                 f" on {remote}" if remote else "", delta.count())
        self._start_sync(fam, clone)

    @staticmethod
    def _initial_delta(fam: Family, store: Store) -> Bitmap:
        """Extents a new clone must receive: the source's allocated ones, and
        on a remote store whatever it does not guarantee to read as zero (it
        may hold old data; a new local file is all holes)."""
        differ = Bitmap(fam.nextents)
        shift, size = fam.shift, fam.source.size

        def mark(start: int, stop: int) -> None:
            for i in range(start >> shift, ((stop - 1) >> shift) + 1):
                differ.set(i)
        for start, stop in vf.data_ranges(fam.source.fd, 0, size):
            mark(start, stop)
        if not is_local(store):
            for start, n, zero in store.allocation(0, size):
                if not zero:
                    mark(start, start + n)
        return differ

    def find_clone(self, name: str) -> tuple[Family, Clone]:
        units.check_name(name)
        rec = self.engine.records.get(name)
        if rec is None:
            raise NotFound(f"no clone named {name!r}; see 'lunclone list'")
        fam = self.families.get(rec.source or "")
        if fam is None or name not in fam.clones:
            raise NotFound(f"{name!r} is not a clone; see 'lunclone status {name}'")
        return fam, fam.clones[name]

    def _set_state(self, fam: Family, clone: Clone, state: str, tx) -> None:
        """Inside a transaction: change a clone's state in the metadata, and
        in memory once it has committed."""
        rec = self.engine.records[clone.name]
        tx.put_volume(dataclasses.replace(rec, clone_state=state))

        def apply() -> None:
            clone.state = state
            rec.clone_state = state
        tx.then(apply)

    async def fracture(self, name: str) -> dict:
        """Synchronized -> fractured, a point-in-time copy.  Writes that
        start after the switch only set delta bits; those that began before
        are mirrored and have ended before the state is committed.  Both
        volumes are then durable, so the write-intent bits of mirrored
        writes are cleared in the same transaction: the delta map is exact."""
        async with self.admin:
            fam, clone = self.find_clone(name)
            with self.lock:  # the state checked where a mirror failure changes it
                if clone.state == FRACTURED:
                    return self.engine.describe(name)
                if clone.state != SYNCHRONIZED:
                    raise Busy(f"clone {name} is {clone.state}; it can be fractured once "
                               f"synchronized (see 'lunclone status {fam.source.name}')")
                failures = clone.mirror_failures
                clone.fracturing = set()  # before the state: keeps the fast path off
                clone.state = FRACTURED
                older_writes = fam.source.barrier.switch()
            try:
                await quiesce(older_writes, DRAIN_TIMEOUT, fam.source.name)
                await self._make_durable(fam, clone)
                with self.committer.transaction() as tx:
                    self._commit_fracture(fam, clone, failures, tx)
            except BaseException:
                await self._fracture_failed(fam, clone)
                raise
            finally:
                with self.lock:
                    clone.fracturing = None
                    fam.refresh_fast()
            log.info("clone %s fractured", name)
            return self.engine.describe(name)

    async def _make_durable(self, fam: Family, clone: Clone) -> None:
        """Before bits are cleared for data both volumes hold: fdatasync
        local files (at the next commit), flush a remote clone now."""
        store = clone.volume.store
        if not is_local(store):
            await self.engine.loop.run_in_executor(self.pool, store.flush)
        with self.lock:
            self.committer.copied_into(fam.source.fd)
            if is_local(store):
                self.committer.copied_into(store.fd)

    def _commit_fracture(self, fam: Family, clone: Clone, failures: int, tx) -> None:
        """Under the transaction: the state, and the delta map without the
        intent bits of writes that were mirrored (unless a mirror failed)."""
        delta = clone.delta
        keep = clone.fracturing or set()
        idle = [] if clone.mirror_failures != failures else [
            i for i in delta.iter_set() if i not in keep and not fam.writers.get(i)]
        exact = delta.copy(delta.key)
        for i in idle:
            exact.clear(i)
        tx.replace_bitmap(clone.name, "delta", exact)
        self._set_state(fam, clone, FRACTURED, tx)

        def clear() -> None:  # under the lock since ``idle`` was picked: no write came
            for i in idle:
                delta.clear(i)
        tx.then(clear)

    async def _fracture_failed(self, fam: Family, clone: Clone) -> None:
        """Writes since the switch were not mirrored: the clone is no longer
        a mirror.  Its bits (all committed) record where it may differ, so
        it resynchronizes once writes that took the old rules have ended;
        the database's 'synchronized with intent bits' means the same after
        a restart."""
        with self.lock:
            if clone.state != FRACTURED or \
                    self.engine.records[clone.name].clone_state == FRACTURED:
                return
            clone.state = SYNCHRONIZING  # its own export refuses writes from now on
            older = (clone.volume.barrier.switch(), fam.switch_fast())
        for gen in older:
            await quiesce(gen, float("inf"), clone.name)
        self._start_sync(fam, clone)

    async def sync(self, name: str) -> dict:
        async with self.admin:
            fam, clone = self.find_clone(name)
            r = fam.restore
            if r is not None and r.clone is not clone:
                raise Busy(f"{fam.source.name} is being restored from {r.clone.name}; sync "
                           f"{name} after the restore (its source is changing under it)")
            if clone.state == SYNCHRONIZING:
                clone.error = None
                self._start_sync(fam, clone)  # again, if it stopped on an error
            if clone.state in MIRRORED:
                return self.engine.describe(name)
            if clone.state != FRACTURED:
                raise Busy(f"clone {name} is {clone.state}; wait for the restore to finish")
            with self.lock:
                clone.state = SYNCHRONIZING  # its own export refuses writes from now on
                older = (clone.volume.barrier.switch(), fam.switch_fast())
            try:
                for gen in older:
                    await quiesce(gen, DRAIN_TIMEOUT, name)
                with self.committer.transaction() as tx:
                    self._set_state(fam, clone, SYNCHRONIZING, tx)
            except BaseException:
                with self.lock:
                    clone.state = FRACTURED  # the rules of both states set delta bits alike
                raise
            clone.error = None
            clone.sync = type(clone.sync)()
            self._start_sync(fam, clone)
            return self.engine.describe(name)

    async def delete_clone(self, name: str) -> dict:
        async with self.admin:
            return await self.delete_clone_locked(name)

    async def delete_clone_locked(self, name: str) -> dict:
        """The record goes first; memory and the file follow once that has
        committed.  Writes that may still mirror into the clone, and its
        sync job's copies, end before its file is closed."""
        fam, clone = self.find_clone(name)
        if fam.restore is not None and fam.restore.clone is clone:
            raise Busy(f"clone {name} is the source of a running restore of "
                       f"{fam.source.name}; wait for it to finish")
        with self.committer.transaction() as tx:
            if clone.volume.connections:  # under the lock: no open can slip in
                raise Busy(f"clone {name} has {clone.volume.connections} open "
                           "connection(s); disconnect them first")
            tx.delete_volume(name)

            def forget() -> None:
                fam.remove_clone(name)
                self.committer.unregister(clone.delta)
                self.engine.volumes.pop(name, None)  # no new connection from now on
            tx.then(forget)
        if faults.armed is not None:
            faults.hit("clone.delete_committed")
        with self.lock:  # after forget(): new writes and flushes no longer see it
            older = (fam.source.barrier.switch(), clone.volume.barrier.switch())
        for gen in older:
            await quiesce(gen, float("inf"), name)
        job = self.jobs.pop(f"sync:{name}", None)
        if job is not None and job.task is not None:
            await asyncio.gather(job.task, return_exceptions=True)
        self.engine.forget_volume(name, clone.volume)
        await self._drop_family_if_unused(fam)
        log.info("clone %s deleted", name)
        return {"deleted": name}

    async def _drop_family_if_unused(self, fam: Family) -> None:
        """Back to the hot path, once writes that still follow the family's
        rules have ended (a new clone's scan must see their data)."""
        if not fam.clones and fam.restore is None and \
                self.families.get(fam.source.name) is fam:
            del self.families[fam.source.name]
            await quiesce(fam.source.switch_policy(None), float("inf"), fam.source.name)

    def finish_sync(self, clone: Clone) -> bool:
        """The sync job found the delta map empty: synchronized, if still so."""
        fam, _ = self.find_clone(clone.name)
        with self.committer.transaction() as tx:
            if (clone.state != SYNCHRONIZING or clone.delta.any()
                    or self.committer.has_requests(clone.delta)
                    or fam.inflight):
                return False
            self._set_state(fam, clone, SYNCHRONIZED, tx)
            tx.save_bitmap(clone.name, "delta", clone.delta)
        log.info("clone %s synchronized (%d bytes copied)", clone.name, clone.sync.copied_bytes)
        return True

    def _mirror_failed(self, clone: Clone) -> None:
        """A mirror write failed (nbdkit thread): resynchronize that clone,
        if it is still the synchronizing clone of this family by then."""
        fam, loop = clone.family, self.engine.loop
        if fam is None or loop is None:  # deleted meanwhile, or not started
            return

        def resync() -> None:
            if fam.clones.get(clone.name) is not clone or clone.state != SYNCHRONIZING:
                return
            try:
                with self.committer.transaction() as tx:
                    self._set_state(fam, clone, SYNCHRONIZING, tx)
            except LuncloneError as e:
                log.error("could not record that %s resynchronizes: %s", clone.name, e.message)
            self._start_sync(fam, clone)
        loop.call_soon_threadsafe(resync)

    def _start_sync(self, fam: Family, clone: Clone) -> None:
        key = f"sync:{clone.name}"
        if is_running(self.jobs.get(key)):
            return
        job = SyncJob(fam, clone, self.pool, self.finish_sync)
        job.task = self.engine.loop.create_task(self._run_job(job, key))
        self.jobs[key] = job

    async def _run_job(self, job, key: str) -> None:
        try:
            await job.run()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("%s job failed", key)
            job.failed(f"internal error: {e!r}")

    # -- restore ------------------------------------------------------------
    async def start_restore(self, source: str, clone_name: str, protected: bool = True,
                            rate_limit=0) -> dict:
        async with self.admin:
            return await self._start_restore(source, clone_name, protected, rate_limit)

    async def _start_restore(self, source: str, clone_name: str, protected: bool,
                             rate_limit) -> dict:
        units.check_name(source)
        rate_limit = units.parse_size(rate_limit or 0)
        self.engine.get_volume(source)
        fam, clone = self.find_clone(clone_name)
        if fam.source.name != source:
            raise InvalidArgument(f"{clone_name} is a clone of {fam.source.name}, not of {source}")
        if fam.restore is not None:
            raise Busy(f"{source} is already being restored from {fam.restore.clone.name}; "
                       f"see 'lunclone status {source}'")
        if clone.state != FRACTURED:
            raise Busy(f"clone {clone_name} is {clone.state}; only a fractured clone (a "
                       f"point-in-time copy) can be restored: 'lunclone clone fracture {clone_name}'")
        old_state = clone.state
        r = await self._gate_restore(fam, clone, protected, old_state)
        r.rate_limit = rate_limit
        try:
            if faults.armed is not None:
                faults.hit("restore.gated")

            self._commit_restore_start(fam, r)
        except BaseException:
            self._undo_restore_start(fam, clone, old_state)
            raise
        finally:
            r.ready.set()
        log.info("restore of %s from %s started: %d extents to copy (%s)", source,
                 clone_name, r.total_extents, "protected" if protected else "unprotected")
        self._start_restore_job(fam)
        return self.engine.describe(source)

    async def _gate_restore(self, fam: Family, clone: Clone, protected: bool,
                            old_state: str) -> Restore:
        """Install the restore with its gate closed, then let old writes end."""
        n = fam.nextents
        r = Restore(clone, protected, Bitmap(n, key=(fam.source.name, "pending")),
                    Bitmap(n, key=(fam.source.name, "protected")), 0)
        with self.lock:
            fam.restore = r
            clone.state = RESTORING
            older = (clone.volume.barrier.switch(), fam.switch_fast())
        try:
            for gen in older:
                await quiesce(gen, DRAIN_TIMEOUT, fam.source.name)
            # Slow-path writes decided under the old rules are registered
            # writers; new ones wait at the gate (``r.ready``).
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while fam.writers:
                if time.monotonic() > deadline:
                    raise Busy(f"host writes to {fam.source.name} did not finish; try again")
                await asyncio.sleep(0.0005)
        except BaseException:
            self._undo_restore_start(fam, clone, old_state)
            r.ready.set()
            raise
        return r

    def _undo_restore_start(self, fam: Family, clone: Clone, state: str) -> None:
        """The start did not commit: take the restore out and put its clone's
        state back.  Only these two changed before the commit (the gate);
        every other change waits for it (``tx.then``), and other clones may
        have changed state meanwhile (a sync finished): they are left alone."""
        with self.lock:
            fam.restore = None
            clone.state = state

    def _commit_restore_start(self, fam: Family, r: Restore) -> None:
        clone = r.clone
        with self.committer.transaction() as tx:
            r.pending.assign(clone.delta)
            r.total_extents = r.pending.count()
            self._set_state(fam, clone, RESTORING, tx)
            for other in fam.clones.values():
                if other is clone:
                    continue
                if other.state in MIRRORED:
                    self._set_state(fam, other, FRACTURED, tx)
                grown = other.delta.copy(other.delta.key)
                grown.union(r.pending)
                tx.replace_bitmap(other.name, "delta", grown)
                tx.then(functools.partial(other.delta.union, r.pending))
            tx.delete_bitmap(fam.source.name, "pending")
            tx.delete_bitmap(fam.source.name, "protected")
            tx.save_bitmap(fam.source.name, "pending", r.pending)
            tx.put_job(self._job_record(fam, r))
            tx.then(functools.partial(self.committer.register, r.pending))
            tx.then(functools.partial(self.committer.register, r.protected))

    def _job_record(self, fam: Family, r: Restore) -> JobRecord:
        return JobRecord(fam.source.name, "restore", r.clone.name, r.state, r.protected_mode,
                         r.total_extents, r.progress.copied_bytes, r.on_demand, r.rate_limit,
                         r.error, time.time())

    def _start_restore_job(self, fam: Family) -> None:
        key = f"restore:{fam.source.name}"
        job = RestoreJob(fam, fam.restore, self.pool, self.finish_restore, self.pause_with_error)
        job.task = self.engine.loop.create_task(self._run_job(job, key))
        self.jobs[key] = job

    def finish_restore(self, fam: Family) -> bool:
        """Pending is empty: in one transaction the clone's delta map becomes
        the protected restore map, and the clone goes back to fractured
        (``--unprotected``, or a restore whose mirror failed: synchronizing,
        so the protected extents are copied to it)."""
        r = fam.restore
        if faults.armed is not None:
            faults.hit("restore.finish")
        with self.committer.transaction() as tx:
            if (r is None or r.pending.any() or fam.inflight
                    or self.committer.has_requests(r.protected)):
                return False
            clone = r.clone
            # The protected map is exactly what the host changed; with
            # --unprotected those writes were mirrored, but a crash may have
            # cut one short, so the clone resynchronizes them (cheaply).
            delta = r.protected.copy(clone.delta.key)
            tx.replace_bitmap(clone.name, "delta", delta)
            self._set_state(fam, clone, FRACTURED if r.protected_mode else SYNCHRONIZING, tx)
            tx.delete_bitmap(fam.source.name, "pending")
            tx.delete_bitmap(fam.source.name, "protected")
            tx.put_job(dataclasses.replace(self._job_record(fam, r), state=DONE))

            def done() -> None:
                clone.delta.assign(delta)
                r.state = DONE
                self.committer.unregister(r.pending)
                self.committer.unregister(r.protected)
                fam.restore = None
                fam.last_restore = r
            tx.then(done)
        log.info("restore of %s from %s done: %d bytes copied, %d on demand, %d protected",
                 fam.source.name, clone.name, r.progress.copied_bytes, r.on_demand,
                 r.protected.count())
        if clone.state == SYNCHRONIZING:
            self._start_sync(fam, clone)
        return True

    def _restore_of(self, source: str) -> tuple[Family, Restore]:
        units.check_name(source)
        self.engine.get_volume(source)
        fam = self.families.get(source)
        if fam is None or fam.restore is None:
            raise NotFound(f"no restore of {source} is in progress")
        return fam, fam.restore

    def _persist_job(self, fam: Family, r: Restore, **changes) -> None:
        """Record the job with ``changes``; apply them to ``r`` once committed."""
        with self.committer.transaction() as tx:
            tx.put_job(dataclasses.replace(self._job_record(fam, r), **changes))
            tx.then(lambda: [setattr(r, k, v) for k, v in changes.items()])

    async def pause(self, source: str) -> dict:
        async with self.admin:
            fam, r = self._restore_of(source)
            self._persist_job(fam, r, state=PAUSED)
            return self.engine.describe(source)

    def pause_with_error(self, fam: Family, message: str | None) -> None:
        """Pause in memory at once (the job stops retrying); persist if the
        metadata can take it (on a full disk it may not: after a restart the
        job then runs again)."""
        r = fam.restore
        if r is None:
            return
        r.state, r.error = PAUSED, message
        try:
            self._persist_job(fam, r)
        except LuncloneError as e:
            log.error("could not record the pause of %s: %s", fam.source.name, e.message)
        log.error("restore of %s paused: %s; 'lunclone restore resume %s' goes on",
                  fam.source.name, message, fam.source.name)

    async def resume(self, source: str) -> dict:
        async with self.admin:
            units.check_name(source)
            if source in self.engine.broken and source in self.engine.records:
                self._bring_back(source)
            fam, r = self._restore_of(source)
            self._persist_job(fam, r, state=RUNNING, error=None)
            if not is_running(self.jobs.get(f"restore:{source}")):
                self._start_restore_job(fam)
            return self.engine.describe(source)

    def _bring_back(self, source: str) -> None:
        """A source kept unserved because its restore's clone was missing:
        open its volumes again; if the clone is back, serve the family and
        let the restore go on."""
        eng = self.engine
        names = [source] + [n for n, rec in eng.records.items() if rec.source == source]
        for name in names:
            if name in eng.broken:
                eng.serve_again(name)
        job = next((j for j in eng.md.jobs() if j.source == source), None)
        if source not in eng.volumes:
            raise NotFound(f"volume {source!r} is not served: {eng.broken[source]}")
        self._load_family(source)
        if job is not None and job.kind == "restore":
            self._load_restore(job)
        if source in eng.broken:
            raise NotFound(f"volume {source!r} is not served: {eng.broken[source]}")
        fam = self.families.get(source)
        if fam is not None:
            for clone in fam.clones.values():
                if clone.state == SYNCHRONIZING:
                    self._start_sync(fam, clone)
        log.info("volume %s is served again", source)

    async def set_rate(self, source: str, limit) -> dict:
        async with self.admin:
            fam, r = self._restore_of(source)
            limit = units.parse_size(limit)
            if limit < 0:
                raise InvalidArgument("rate must be 0 (unlimited) or a positive number of bytes/s")
            self._persist_job(fam, r, rate_limit=limit)
            job = self.jobs.get(f"restore:{source}")
            if job is not None:
                job.throttle.set(limit)
            return self.engine.describe(source)

    # -- views ----------------------------------------------------------------
    def describe_clones(self, name: str) -> list[dict]:
        fam = self.families.get(name)
        if fam is None:
            return []
        out = []
        with self.lock:
            for c in fam.clones.values():
                d = {"name": c.name, "state": c.state, "delta_extents": c.delta.count(),
                     "error": c.error, "remote": c.volume.store.describe()}
                if c.state == SYNCHRONIZING:
                    d["sync"] = _progress(c.sync, d["delta_extents"], fam.source.extent_size)
                out.append(d)
        return out

    def describe_restore(self, name: str) -> dict | None:
        fam = self.families.get(name)
        if fam is None:
            return None
        r = fam.restore or fam.last_restore
        if r is None:
            return None
        with self.lock:
            pending = r.pending.count() if r.state != DONE else 0
            d = {"from": r.clone.name, "state": r.state, "protected": r.protected_mode,
                 "total_extents": r.total_extents, "pending_extents": pending,
                 "protected_extents": r.protected.count(), "on_demand_extents": r.on_demand,
                 "rate_limit_bytes_per_s": r.rate_limit, "error": r.error}
        d.update(_progress(r.progress, pending, fam.source.extent_size))
        return d

    async def close(self) -> None:
        if getattr(self, "_sweeper", None) is not None:
            self._sweeper.cancel()
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()
        for job in self.jobs.values():
            if job.task is not None:
                try:
                    await job.task
                except (asyncio.CancelledError, Exception):
                    pass
        self.pool.shutdown(wait=True)


def _progress(p, remaining_extents: int, extent_size: int) -> dict:
    rate = p.rate()
    return {"copied_bytes": p.copied_bytes, "rate_bytes_per_s": round(rate),
            "eta_s": round(remaining_extents * extent_size / rate, 1) if rate > 0 else None}
