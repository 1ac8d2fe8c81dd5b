"""Families: which volumes are clones of which, and how admin commands
change the rules host writes follow.

A source with clones or a restore has a ``policy.Family`` (its volume's
policy); a source with neither is on the plain hot path.  ``Families`` is
the registry, rebuilt from the metadata at start-up; ``new_rules`` is the
one way an admin command changes what host writes do (see below).

At start-up the delta maps of a family whose clones are all fractured
are left unloaded (their counts only, ``Bitmap.unloaded``): a state
directory of many large volumes with point-in-time clones starts without
reading their maps, and holds in memory only those of the families in
use.  A family's maps are loaded (``load_maps``) before anything reads
their bits: ``get``, ``of`` and ``find_clone`` (admin commands and jobs)
and ``open_export`` (a client's first connection to the source or one of
its clones; no request can reach the family before).  Status and metrics
read counts only (``peek``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import AsyncIterator, Callable, Sequence

from . import units
from .bitmap import Bitmap
from .commit import Committer
from .errors import NotFound
from .iopath import Volume, quiesce
from .metadata import DELTA
from .policy import FRACTURED, SYNCHRONIZED, SYNCHRONIZING, Clone, CloneExport, Family
from .volumes import VolumeTable

log = logging.getLogger("lunclone.families")

DRAIN_TIMEOUT = 60.0
Generations = Sequence[list[None]]


class Families:
    def __init__(self, volumes: VolumeTable, committer: Committer):
        self.volumes = volumes
        self.committer = committer
        self.by_source: dict[str, Family] = {}
        # Set by the clone admin: a mirror write failed (nbdkit thread).
        self.on_mirror_failed: Callable[[Clone], None] | None = None
        # A lock per family whose maps start-up left unloaded, held while
        # they are read; taken before, never under, the maps lock (and the
        # metadata's lock is not held while waiting for it).  Removed, under
        # the maps lock, once the family is loaded and its fast path made.
        self._load_locks: dict[str, threading.Lock] = {}

    def get(self, source: str) -> Family | None:
        """The family of ``source``, its maps loaded."""
        fam = self.by_source.get(source)
        if fam is not None:
            self.load_maps(fam)
        return fam

    def peek(self, source: str) -> Family | None:
        """The family of ``source`` as it is, maps perhaps unloaded: for
        readers of counts and states only (status, metrics, waits)."""
        return self.by_source.get(source)

    def load_maps(self, fam: Family) -> None:
        """Read the delta maps start-up left unloaded, once; at once if
        there are none (without a lock: ``_bring_back`` calls it holding
        the maps lock, for a family it loaded itself).  All are read first,
        then filled in one hold of the maps lock, which also makes the fast
        path again (its tuple held the unloaded buffers) and only then marks
        the family loaded: whoever finds it loaded finds its fast path made.
        From the loop (an admin command), this blocks the loop for the read,
        once per family: tens of milliseconds for eight 1 TiB maps."""
        name = fam.source.name
        lock = self._load_locks.get(name)
        if lock is None:
            return
        with lock:
            if self._load_locks.get(name) is not lock:
                return  # loaded meanwhile
            lazy = [c for c in list(fam.clones.values()) if not c.delta.loaded]
            stored = [self.committer.md.load_bitmap(c.name, DELTA, fam.nextents) for c in lazy]
            with self.committer.maps_lock:
                for clone, bm in zip(lazy, stored):
                    clone.delta.fill(bm)
                fam.refresh_fast()
                del self._load_locks[name]

    def load_maps_of(self, name: str) -> None:
        """Before a client's first connection to ``name``: the maps of its
        family (as a source or as a clone)."""
        rec = self.volumes.records.get(name)
        fam = self.by_source.get(rec.source or name) if rec is not None else None
        if fam is not None:
            self.load_maps(fam)

    def of(self, src: Volume) -> tuple[Family, Generations]:
        """The family of a source volume, made (and made its policy) if new;
        and the generation of writes that took the plain path before, which
        the caller waits for (``new_rules`` does, on the loop: a plain
        write may be held up by its storage, and the loop must go on)."""
        fam = self.by_source.get(src.name)
        if fam is not None:
            self.load_maps(fam)
            return fam, ()
        fam = Family(src, self.committer, self.committer.maps_lock,
                     on_mirror_failed=self._mirror_failed)
        self.by_source[src.name] = fam
        return fam, (src.switch_policy(fam),)

    def _mirror_failed(self, clone: Clone) -> None:
        if self.on_mirror_failed is not None:
            self.on_mirror_failed(clone)

    def find_clone(self, name: str) -> tuple[Family, Clone]:
        units.check_name(name)
        rec = self.volumes.records.get(name)
        if rec is None:
            raise NotFound(f"no clone named {name!r}; see 'lunclone list'")
        fam = self.by_source.get(rec.source or "")
        if rec.source is not None and name in self.volumes.broken:  # not loaded
            raise NotFound(f"clone {name!r} is not served: {self.volumes.broken[name]}")
        if fam is None or name not in fam.clones:
            raise NotFound(f"{name!r} is not a clone; see 'lunclone status {name}'")
        self.load_maps(fam)
        return fam, fam.clones[name]

    # -- start-up --------------------------------------------------------------
    def load_all(self) -> None:
        """Every served source's family; a clone whose source is not served
        is not served either (closed: with no family it would have no
        policy, and a client's writes to it would be in no delta map)."""
        vols = self.volumes
        counts = self.committer.md.map_counts()
        for rec in vols.records.values():
            if rec.source is None and rec.name in vols.served:
                self.load(rec.name, counts)
            elif rec.source is not None and rec.name in vols.served \
                    and rec.source not in vols.served:
                vols.unserve(rec.name, f"its source {rec.source!r} is not served")

    def load(self, source: str, counts: dict[tuple[str, str], int] | None = None) -> None:
        """A served source's clones (those whose volume could be opened).
        With the stored maps' ``counts`` (start-up), the delta maps of a
        family whose clones are all fractured are left unloaded (a sync
        job, started next, would read them)."""
        vols = self.volumes
        clones = [r for r in vols.clones_of(source) if r.name in vols.served]
        if not clones:
            return
        lazy = counts is not None and all(r.clone_state == FRACTURED for r in clones)
        fam, _ = self.of(vols.served[source])  # start-up: no write yet
        if lazy:
            self._load_locks[source] = threading.Lock()
        for rec in clones:
            if lazy:
                delta = Bitmap.unloaded(fam.nextents, (rec.name, DELTA),
                                        counts.get((rec.name, DELTA), 0))
            else:
                delta = self.committer.md.load_bitmap(rec.name, DELTA, fam.nextents)
            clone = Clone(rec.name, vols.served[rec.name], rec.clone_state, delta)
            self.committer.register(delta)
            fam.add_clone(clone)
            clone.volume.set_policy(CloneExport(fam, clone))

    def distrust_absent(self, names: list[str] | None = None) -> None:
        """Clones that stay unserved while their source is served: nothing
        tracks the source's writes for them (they have no place in its
        family), so if their file comes back they may differ anywhere.
        Before any client can write, in one transaction, each one's stored
        delta map becomes full and a synchronized one resynchronizing: a
        restore from it then copies every extent, a sync all of them.
        ``names``: those clones (default, at start-up: every unserved clone
        of a served source)."""
        vols = self.volumes
        if names is None:
            names = [r.name for r in vols.records.values()
                     if r.source in vols.served and r.name in vols.broken]
        if not names:
            return
        md = self.committer.md
        recs = [r for r in (vols.records[name] for name in names)  # not done already
                if r.clone_state == SYNCHRONIZED
                or md.map_count(r.name, DELTA) != r.nextents]
        if not recs:
            return
        with md.transaction() as tx:  # their maps are not in memory
            for rec in recs:
                full = Bitmap(rec.nextents)
                full.set_all()
                tx.replace_bitmap(rec.name, DELTA, full)
                if rec.clone_state == SYNCHRONIZED:
                    tx.put_volume(dataclasses.replace(rec, clone_state=SYNCHRONIZING))
        for rec in recs:
            if rec.clone_state == SYNCHRONIZED:
                rec.clone_state = SYNCHRONIZING
            log.warning("clone %s is not served while its source is: it will be copied "
                        "whole (restore) or resynchronized if it comes back", rec.name)

    def unserve(self, fam: Family | None, source: str, why: str) -> None:
        """Stop serving a source and its clones (start-up, or a restore that
        cannot go on)."""
        if fam is not None:
            for clone in list(fam.clones.values()):
                self.committer.unregister(clone.delta)
                self.volumes.unserve(clone.name, f"its source {source!r} is not served")
            del self.by_source[source]
        self._load_locks.pop(source, None)
        self.volumes.unserve(source, why)

    async def drop_if_unused(self, fam: Family) -> None:
        """Back to the hot path, once writes that still follow the family's
        rules have ended (a new clone's scan must see their data)."""
        if not fam.clones and fam.restore is None and self.by_source.get(fam.source.name) is fam:
            del self.by_source[fam.source.name]
            await quiesce(fam.source.switch_policy(None), float("inf"), fam.source.name)


@contextlib.asynccontextmanager
async def new_rules(fam: Family, name: str, install: Callable[[], Generations],
                    undo: Callable[[], Generations | None],
                    timeout: float = DRAIN_TIMEOUT) -> AsyncIterator[None]:
    """Change the rules host writes follow, the one way admin commands do.

    ``install`` runs under the maps lock and returns the write generations
    that decided under the old rules; they are waited for (without the
    lock), then the body runs (scans, copies, the transaction that records
    the change).  If the wait or the body fails, ``undo`` runs under the
    lock and puts the old rules back (returning generations to wait for, if
    writes may have taken the new rules meanwhile): the command changed
    nothing.  In-memory changes other than the rules wait for COMMIT
    (``tx.then``), so memory is never ahead of the database.
    """
    with fam.maps_lock:
        older = install()
    try:
        for gen in older:
            await quiesce(gen, timeout, name)
        yield
    except BaseException:
        with fam.maps_lock:
            newer = undo() or ()
        for gen in newer:
            await quiesce(gen, float("inf"), name)
        raise
