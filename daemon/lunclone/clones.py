"""Admin commands on clones: create, fracture, sync, delete; the end of a
sync; a failed mirror write; the sweep of write-intent bits.

Runs on the asyncio thread (control server) and at start-up.  What a
clone's state means for a host request is in ``policy``; how a change of
rules is installed, waited for and undone is ``families.new_rules``.

Ordering rules for a change:
- Admin commands run one at a time (``admin``, an asyncio lock shared with
  ``restores`` and volume delete) and never block the loop: a host write
  they wait for may itself wait for a copy whose end runs on the loop.
- A change that makes host writes follow new rules installs them under the
  maps lock and waits for writes that decided under the old rules before
  scanning or copying maps (``new_rules``); if that fails, the old rules
  are put back: the command changed nothing.
- The database is changed in ``Committer.transaction()``; the in-memory
  state follows with ``tx.then`` after COMMIT.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from . import faults, undo
from . import volume as vf
from .bitmap import Bitmap
from .commit import Committer
from .errors import Busy, InvalidArgument, LuncloneError, WrongState
from .families import Families, new_rules
from .iopath import Volume, quiesce
from .jobs import JobKey, JobRunner, SyncJob
from .metadata import DELTA, Transaction, VolumeRecord
from .policy import (FRACTURED, MIRRORED, SYNCHRONIZED, SYNCHRONIZING, Clone, CloneExport, Family,
                     Progress, Restore, undo_refusal)
from .store import FileStore, Store, is_local
from .volumes import VolumeTable

log = logging.getLogger("lunclone.clones")

MAX_CLONES = 8
INTENT_SWEEP_S = 3.0
INTENT_QUIESCE_S = 30.0  # how long a sweep waits for fast-path writes


class Clones:
    def __init__(self, volumes: VolumeTable, families: Families, jobs: JobRunner,
                 admin: asyncio.Lock):
        self.volumes = volumes
        self.families = families
        self.committer: Committer = families.committer
        self.maps_lock = self.committer.maps_lock
        self.jobs = jobs
        self.admin = admin
        families.on_mirror_failed = self._mirror_failed
        self._sweeper: asyncio.Task | None = None

    # -- start-up --------------------------------------------------------------
    def start(self) -> None:
        """On the loop: resume syncs.  A synchronized clone with write-intent
        bits set may differ where a mirrored write was cut short by a crash:
        it resynchronizes those extents."""
        for fam in self.families.by_source.values():
            self.resume_syncs(fam)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_intents())

    def resume_syncs(self, fam: Family) -> None:
        """A family just loaded (start-up, a source served again): its
        synchronized clones with intent bits resynchronize (the sweeper
        would clear those bits without a copy), and syncs go on."""
        for clone in fam.clones.values():
            if clone.state == SYNCHRONIZED and clone.delta.any():
                with self.committer.transaction() as tx:
                    self.set_state(clone, SYNCHRONIZING, tx)
            if clone.state == SYNCHRONIZING:
                self.start_sync(fam, clone)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep_intents(self) -> None:
        while True:
            await asyncio.sleep(INTENT_SWEEP_S)
            for fam in list(self.families.by_source.values()):
                for clone in list(fam.clones.values()):
                    await self.sweep_intents(fam, clone)

    async def sweep_intents(self, fam: Family, clone: Clone) -> int:
        """Clear the idle write-intent bits of a synchronized clone (every
        INTENT_SWEEP_S): pick the idle bits, let fast-path writes that may
        have missed ``clone.hot`` end, flush a remote clone (a local one is
        fdatasync'ed by the commit), then clear what stayed idle.  Returns
        how many bits were cleared."""
        with self.maps_lock:
            idle = fam.idle_intents(clone)
            if not idle:
                return 0
            before = fam.switch_fast()
        try:
            for writes in before:
                await quiesce(writes, INTENT_QUIESCE_S, fam.source.name)
        except Busy:  # a write hangs (a remote mirror): next time
            return 0
        store = clone.volume.store
        if not is_local(store):
            try:
                await asyncio.get_running_loop().run_in_executor(self.jobs.pool,
                                                                 store.sweep_flush)
            except OSError as e:  # mirrored writes may be lost: re-copy
                fam.mirror_broken(clone, "flush", e)
                return 0
        with self.maps_lock:
            return fam.clear_intents(clone, idle)

    # -- create ----------------------------------------------------------------
    async def create(self, source: str, name: str, remote: str | None = None) -> None:
        async with self.admin:
            vols = self.volumes
            self.volumes.check_new_name(name)
            src = vols.get(source)
            src_rec = vols.records[source]
            if src_rec.source is not None:
                raise InvalidArgument(f"{source!r} is a clone; clone its source {src_rec.source!r}")
            fam = self.families.get(source)
            if fam is not None and fam.restore is not None:
                raise WrongState(f"{source} is being restored; create the clone after the restore")
            if len(vols.clones_of(source)) >= MAX_CLONES:  # one not loaded counts
                raise WrongState(f"{source} has {MAX_CLONES} clones already, the most a "
                                 "volume may have; delete one first")
            if remote:
                store: Store = await asyncio.get_running_loop().run_in_executor(
                    self.jobs.pool, vols.open_remote, name, remote, src.size)
            else:
                store = FileStore(vols.new_file(name, src.size))
            try:
                await self._add(src, name, store, remote)
            except BaseException:
                store.close()
                if store.path:
                    vf.remove(store.path)
                raise

    async def _add(self, src: Volume, name: str, store: Store, remote: str | None) -> None:
        vol = Volume(name, store, src.size, src.extent_size)
        fam, plain_writes = self.families.of(src)
        delta = Bitmap(fam.nextents, key=(name, DELTA))
        clone = Clone(name, vol, SYNCHRONIZING, delta)
        vol.set_policy(CloneExport(fam, clone))
        rec = VolumeRecord(name, src.size, src.extent_size, source=src.name,
                           clone_state=SYNCHRONIZING, remote=remote, created=time.time())

        def install():
            # Registered before any write can set a bit: a bit committed by
            # the group commit is then saved with its page.
            self.committer.register(delta)
            fam.add_clone(clone)  # from now on host writes set its delta bits
            return (*plain_writes, src.barrier.switch())

        def uninstall():
            fam.remove_clone(name)
            self.committer.unregister(delta)
        try:
            async with new_rules(fam, src.name, install, uninstall):
                differ = self._initial_delta(fam, store)
                with self.committer.transaction() as tx:
                    new_delta = delta.copy(delta.key)
                    new_delta.union(differ)
                    tx.delete_bitmap(name, DELTA)  # rows a failed create may have left
                    tx.put_volume(rec)
                    tx.replace_bitmap(name, DELTA, new_delta)
                    tx.then(lambda: delta.union(differ))
        except BaseException:
            await self.families.drop_if_unused(fam)
            raise
        self.volumes.records[name] = rec
        self.volumes.served[name] = vol
        log.info("clone %s of %s created%s: %d extents to copy", name, src.name,
                 f" on {remote}" if remote else "", delta.count())
        self.start_sync(fam, clone)

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

    def set_state(self, clone: Clone, state: str, tx: Transaction) -> None:
        """Inside a transaction: change a clone's state in the metadata, and
        in memory once it has committed."""
        rec = self.volumes.records[clone.name]
        tx.put_volume(dataclasses.replace(rec, clone_state=state))

        def apply() -> None:
            clone.state = state
            rec.clone_state = state
        tx.then(apply)

    # -- fracture ----------------------------------------------------------------
    async def fracture(self, name: str) -> None:
        """Synchronized -> fractured, a point-in-time copy.  Writes that
        start after the switch only set delta bits; those that began before
        are mirrored and have ended before the state is committed.  Both
        volumes are then durable, so the write-intent bits of mirrored
        writes are cleared in the same transaction: the delta map is exact."""
        async with self.admin:
            fam, clone = self.families.find_clone(name)
            if clone.state == FRACTURED:  # only admin commands leave this state
                return
            failures, installed = 0, False

            def install():
                # The state is checked under the lock, where a mirror failure changes it.
                nonlocal failures, installed
                if clone.state != SYNCHRONIZED:
                    raise WrongState(f"clone {name} is {clone.state}; it can be fractured once "
                                     f"synchronized (see 'lunclone status {fam.source.name}')")
                failures = clone.mirror_failures
                clone.fracturing = set()  # before the state: keeps the fast path off
                clone.state = FRACTURED
                installed = True
                return (fam.source.barrier.switch(),)
            try:
                async with new_rules(fam, fam.source.name, install,
                                     lambda: self._fracture_failed(fam, clone)):
                    await self._make_durable(fam, clone)
                    with self.committer.transaction() as tx:
                        self._commit_fracture(fam, clone, failures, tx)
            except BaseException:
                if installed and clone.state == SYNCHRONIZING:  # undone: resync
                    self.start_sync(fam, clone)
                raise
            finally:
                with self.maps_lock:
                    clone.fracturing = None
                    fam.refresh_fast()
            log.info("clone %s fractured", name)

    async def _make_durable(self, fam: Family, clone: Clone) -> None:
        """Before bits are cleared for data both volumes hold: fdatasync
        local files (at the next commit), flush a remote clone now."""
        store = clone.volume.store
        if not is_local(store):
            await asyncio.get_running_loop().run_in_executor(self.jobs.pool, store.flush)
        with self.maps_lock:
            self.committer.copied_into(fam.source.fd)
            if is_local(store):
                self.committer.copied_into(store.fd)

    def _commit_fracture(self, fam: Family, clone: Clone, failures: int,
                         tx: Transaction) -> None:
        """Under the transaction: the state, and the delta map without the
        intent bits of writes that were mirrored (unless a mirror failed)."""
        delta = clone.delta
        keep = clone.fracturing or set()
        idle = [] if clone.mirror_failures != failures else [
            i for i in delta.iter_set() if i not in keep and not fam.guard.writing(i)]
        exact = delta.copy(delta.key)
        for i in idle:
            exact.clear(i)
        tx.replace_bitmap(clone.name, DELTA, exact)
        self.set_state(clone, FRACTURED, tx)

        def clear() -> None:  # under the lock since ``idle`` was picked: no write came
            for i in idle:
                delta.clear(i)
        tx.then(clear)

    def _fracture_failed(self, fam: Family, clone: Clone):
        """Under the lock: writes since the switch were not mirrored, so the
        clone is no longer a mirror.  Its bits (all committed) record where
        it may differ: it resynchronizes once writes that took the old rules
        have ended (the generations returned); the database's 'synchronized
        with intent bits' means the same after a restart."""
        if clone.state != FRACTURED or self.volumes.records[clone.name].clone_state == FRACTURED:
            return ()
        clone.state = SYNCHRONIZING  # its own export refuses writes from now on
        return (clone.volume.barrier.switch(), *fam.switch_fast())

    # -- sync --------------------------------------------------------------------
    async def sync(self, name: str, force: bool = False) -> None:
        async with self.admin:
            fam, clone = self.families.find_clone(name)
            point = self._undo_point_on(fam, clone, force)
            r = fam.restore
            if r is not None and r.clone is not clone:
                raise WrongState(f"{fam.source.name} is being restored from {r.clone.name}; "
                                 f"sync {name} after the restore (its source is changing "
                                 "under it)")
            if clone.state == SYNCHRONIZING:
                clone.error = None
                self.start_sync(fam, clone)  # again, if it stopped on an error
            if clone.state in MIRRORED:
                return
            if clone.state != FRACTURED:
                raise WrongState(f"clone {name} is {clone.state}; wait for the restore to finish")

            def install():
                clone.state = SYNCHRONIZING  # its own export refuses writes from now on
                return (clone.volume.barrier.switch(), *fam.switch_fast())

            def uninstall():
                clone.state = FRACTURED  # the rules of both states set delta bits alike
            job = undo.job_of(self.committer, fam.source.name)
            async with new_rules(fam, name, install, uninstall):
                with self.committer.transaction() as tx:
                    self.set_state(clone, SYNCHRONIZING, tx)
                    dropped = undo.forget_point(self.committer, point, job, tx)
            self._undo_point_dropped(fam, clone, dropped)
            clone.error = None
            clone.sync_progress = Progress()
            self.start_sync(fam, clone)

    def start_sync(self, fam: Family, clone: Clone) -> None:
        """Start the clone's sync job, unless a restore start is in progress
        (gate closed): it fractures the clone, or restarts the job if it
        fails (``Restores.begin``)."""
        key = JobKey("sync", clone.name)
        r = fam.restore
        if r is not None and not r.ready.is_set() and r.clone is not clone:
            return
        if not self.jobs.running(key):
            self.jobs.run(key, SyncJob(fam, clone, self.jobs.pool, self.finish_sync))

    def finish_sync(self, clone: Clone) -> bool:
        """The sync job found the delta map empty: synchronized, if still so."""
        fam, _ = self.families.find_clone(clone.name)
        with self.committer.transaction() as tx:
            if (clone.state != SYNCHRONIZING or clone.delta.any()
                    or self.committer.has_requests(clone.delta)
                    or fam.guard.copying()):
                return False
            self.set_state(clone, SYNCHRONIZED, tx)
            tx.save_bitmap(clone.name, DELTA, clone.delta)
        log.info("clone %s synchronized (%d bytes copied)", clone.name, clone.sync_progress.copied_bytes)
        return True

    def _mirror_failed(self, clone: Clone) -> None:
        """A mirror write failed (nbdkit thread): resynchronize that clone,
        if it is still the synchronizing clone of this family by then."""
        fam, loop = clone.family, self.jobs.loop
        if fam is None or loop is None:  # deleted meanwhile, or not started
            return

        def resync() -> None:
            if fam.clones.get(clone.name) is not clone or clone.state != SYNCHRONIZING:
                return
            try:
                with self.committer.transaction() as tx:
                    self.set_state(clone, SYNCHRONIZING, tx)
            except LuncloneError as e:
                log.error("could not record that %s resynchronizes: %s", clone.name, e.message)
            self.start_sync(fam, clone)
        loop.call_soon_threadsafe(resync)

    # -- delete --------------------------------------------------------------------
    def _undo_point_on(self, fam: Family, clone: Clone, force: bool) -> Restore | None:
        """The undo point a change to ``clone`` would make wrong (a finished
        restore from it), or None.  Refused without ``force``; with it, the
        caller drops the point in the transaction that makes the change
        (``undo.forget_point``), so a refusal later on changes nothing."""
        point = fam.undo_point()
        if point is None or point.clone is not clone or point is fam.restore:
            return None
        if not force:
            raise WrongState(undo_refusal(fam.source.name, clone.name) + ", or use --force")
        return point

    def _undo_point_dropped(self, fam: Family, clone: Clone, dropped: bool) -> None:
        """After the transaction that dropped the point: its image goes."""
        if dropped:
            undo.remove(self.volumes.state_dir, fam.source.name)
            log.warning("undo point of %s dropped (--force on clone %s)", fam.source.name,
                        clone.name)

    async def delete_locked(self, name: str, force: bool = False) -> None:
        """The record goes first; memory and the file follow once that has
        committed.  Writes that may still mirror into the clone, and its
        sync job's copies, end before its file is closed.  An undo point
        rebuilt from the clone refuses it, or with ``force`` goes with it
        (in the same transaction)."""
        fam, clone = self.families.find_clone(name)
        if fam.restore is not None and fam.restore.clone is clone:
            raise WrongState(f"clone {name} is the source of a running restore of "
                             f"{fam.source.name}; wait for it to finish")
        last = self._undo_point_on(fam, clone, force)
        job = undo.job_of(self.committer, fam.source.name)
        with self.committer.transaction() as tx:
            if clone.volume.connections:  # under the lock: no open can slip in
                raise Busy(f"clone {name} has {clone.volume.connections} open "
                                 "connection(s); disconnect them first")
            tx.delete_volume(name)
            # The undo point of a restore from this clone needs the clone.
            dropped = undo.forget_point(self.committer, last, job, tx)

            def forget() -> None:
                fam.remove_clone(name)
                self.committer.unregister(clone.delta)
                self.volumes.served.pop(name, None)  # no new connection from now on
            tx.then(forget)
        self._undo_point_dropped(fam, clone, dropped)
        if faults.armed is not None:
            faults.hit("clone.delete_committed")
        with self.maps_lock:  # after forget(): new writes and flushes no longer see it
            older = (fam.source.barrier.switch(), clone.volume.barrier.switch())
        for gen in older:
            await quiesce(gen, float("inf"), name)
        await self.jobs.end(JobKey("sync", name))
        self.volumes.forget(name, clone.volume)
        await self.families.drop_if_unused(fam)
        log.info("clone %s deleted", name)
