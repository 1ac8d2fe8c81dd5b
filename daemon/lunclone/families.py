"""Families: which volumes are clones of which, and how admin commands
change the rules host writes follow.

A source with clones or a restore has a ``policy.Family`` (its volume's
policy); a source with neither is on the plain hot path.  ``Families`` is
the registry, rebuilt from the metadata at start-up; ``new_rules`` is the
one way an admin command changes what host writes do (see below).
"""
from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Callable, Sequence

from . import units
from .commit import Committer
from .errors import NotFound
from .iopath import Volume, quiesce
from .metadata import DELTA
from .policy import Clone, CloneExport, Family
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

    def get(self, source: str) -> Family | None:
        return self.by_source.get(source)

    def of(self, src: Volume) -> tuple[Family, Generations]:
        """The family of a source volume, made (and made its policy) if new;
        and the generation of writes that took the plain path before, which
        the caller waits for (``new_rules`` does, on the loop: a plain
        write may be held up by its storage, and the loop must go on)."""
        fam = self.by_source.get(src.name)
        if fam is not None:
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
        if fam is None or name not in fam.clones:
            raise NotFound(f"{name!r} is not a clone; see 'lunclone status {name}'")
        return fam, fam.clones[name]

    # -- start-up --------------------------------------------------------------
    def load_all(self) -> None:
        """Every served source's family; a clone whose source is not served
        is not served either (closed: with no family it would have no
        policy, and a client's writes to it would be in no delta map)."""
        vols = self.volumes
        for rec in vols.records.values():
            if rec.source is None and rec.name in vols.served:
                self.load(rec.name)
            elif rec.source is not None and rec.name in vols.served \
                    and rec.source not in vols.served:
                vols.unserve(rec.name, f"its source {rec.source!r} is not served")

    def load(self, source: str) -> None:
        """A served source's clones (those whose volume could be opened)."""
        vols = self.volumes
        clones = [r for r in vols.records.values()
                  if r.source == source and r.name in vols.served]
        if not clones:
            return
        fam, _ = self.of(vols.served[source])  # start-up: no write yet
        for rec in clones:
            delta = self.committer.md.load_bitmap(rec.name, DELTA, fam.nextents)
            clone = Clone(rec.name, vols.served[rec.name], rec.clone_state, delta)
            self.committer.register(delta)
            fam.add_clone(clone)
            clone.volume.set_policy(CloneExport(fam, clone))

    def unserve(self, fam: Family | None, source: str, why: str) -> None:
        """Stop serving a source and its clones (start-up, or a restore that
        cannot go on)."""
        if fam is not None:
            for clone in list(fam.clones.values()):
                self.committer.unregister(clone.delta)
                self.volumes.unserve(clone.name, f"its source {source!r} is not served")
            del self.by_source[source]
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
