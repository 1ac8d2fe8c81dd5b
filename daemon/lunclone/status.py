"""What status, ``--json`` and the metrics show: volumes, clones, restores.

One description of each, used by the control server and by ``metrics``;
the keys are the JSON contract of ``lunclone status --json`` (README).
"""
from __future__ import annotations

import os
from . import undo as undo_image
from .bitmap import byte_ranges
from .errors import InvalidArgument
from .families import Families
from .metadata import CAPTURED, DELTA, PENDING, PROTECTED, JobRecord
from .policy import CLONE_STATES, DONE, PAUSED, RESTORE_STATES, SYNCHRONIZING, Family, Progress
from .volumes import VolumeTable

__all__ = ["Status", "CLONE_STATES", "RESTORE_STATES", "SCHEMA_VERSION"]

# The version of the JSON contract (docs/status.schema.json, CHANGELOG.md):
# fields are only added, never renamed or removed.
SCHEMA_VERSION = 1


class Status:
    def __init__(self, volumes: VolumeTable, families: Families, export_uri):
        self.volumes = volumes
        self.families = families
        self.export_uri = export_uri  # name -> NBD URI
        self.maps_lock = families.committer.maps_lock

    def volume(self, name: str) -> dict:
        rec = self.volumes.record(name)
        vol = self.volumes.served.get(name)
        return {
            "schema_version": SCHEMA_VERSION,
            "name": rec.name,
            "size": rec.size,
            "extent_size": rec.extent_size,
            "export": self.export_uri(rec.name),
            "allocated": _allocated(vol.path) if vol and vol.path else None,
            "remote": rec.remote,
            "connections": vol.connections if vol else 0,
            "error": self.volumes.error_of(name),
            "source": rec.source,
            "clone_state": rec.clone_state,
            "clones": self.clones(name),
            "restore": self.restore(name),
            "undo": self.undo(name),
        }

    def all(self) -> list[dict]:
        return [self.volume(n) for n in sorted(self.volumes.records)]

    def clones(self, source: str) -> list[dict]:
        """The source's clones: those its family holds, then any whose
        record is all that is loaded (a file missing at start-up), with
        the error that keeps them unserved and their stored delta map's
        count: commands refuse because of them, so status shows them."""
        fam = self.families.peek(source)
        out = []
        if fam is not None:
            with self.maps_lock:
                for c in fam.clones.values():
                    d = {"name": c.name, "state": c.state, "delta_extents": c.delta.count(),
                         "error": c.error, "remote": c.volume.store.describe()}
                    if c.state == SYNCHRONIZING:
                        d["sync"] = _progress(c.sync_progress, d["delta_extents"],
                                              fam.source.extent_size)
                    out.append(d)
        if self.volumes.record(source).source is not None:
            return out  # a clone has none
        loaded = {d["name"] for d in out}
        md = self.families.committer.md
        for rec in sorted(self.volumes.clones_of(source), key=lambda rec: rec.name):
            if rec.name not in loaded:
                out.append({"name": rec.name, "state": rec.clone_state,
                            "delta_extents": md.map_count(rec.name, DELTA) or 0,
                            "error": self.volumes.error_of(rec.name) or "not served",
                            "remote": None})
        return out

    def clone_diff(self, name: str) -> list[dict]:
        """Where clone ``name`` and its source may differ, as the byte
        ranges ``nbdinfo --map --json`` prints (``offset``, ``length``,
        ``type``, ``description``), merged and in order: what a backup or
        audit tool reads over NBD to see every difference.  The clone's
        delta map; for the clone a restore copies from, the extents the
        host wrote since it started (its protected map: everywhere else the
        source shows the clone's data, copied or not yet)."""
        fam, differs = self._differs(name)
        return [{"offset": off, "length": length, "type": 1, "description": "may differ"}
                for off, length in byte_ranges(differs, fam.source.extent_size, fam.source.size)]

    def extent_map(self, name: str, cells: int = 1024) -> dict:
        """The volume as ``cells`` cells or fewer (``status --map``), each a
        letter of ``MAP_LETTERS`` for the extents it covers, the first state
        of its kind's list that any of them is in.  A source being restored:
        in flight, pending, written by the host (protected), copied, else
        unchanged; a clone: where it may differ from its source (``clone
        diff``); anything else: kind "none".  The maps are copied under the
        lock and drawn outside it; the cost follows the cells and the pages
        with bits set, not the volume's size."""
        if isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= 1 << 20:
            raise InvalidArgument(f"cells must be a whole number from 1 to {1 << 20}")
        rec = self.volumes.record(name)
        layers, inflight, kind = self._map_layers(name, rec.source)
        nextents = (rec.size + rec.extent_size - 1) // rec.extent_size
        per = -(-nextents // cells)
        out = []
        for c in range(-(-nextents // per)):
            first, last = c * per, min(nextents, (c + 1) * per)
            out.append(next((ch for ch, bm in layers if bm.any_in(first, last)), "."))
        for i in inflight:
            out[i // per] = ">"
        return {"name": name, "kind": kind, "extents": nextents, "extent_size": rec.extent_size,
                "extents_per_cell": per, "cells": "".join(out)}

    def _differs(self, name: str):
        """(family, a copy of where clone ``name`` may differ from its
        source): its delta map; the protected map of the restore that
        copies from it (the source shows the clone's data elsewhere); for
        an undo, also the clone's delta map, which is then the captured
        set (the source shows the pre-restore data there)."""
        fam, clone = self.families.find_clone(name)
        with self.maps_lock:
            r = fam.restore
            if r is None or r.clone is not clone:
                return fam, clone.delta.copy()
            differs = r.protected.copy()
            if r.kind == "undo":
                differs.union(clone.delta)
            return fam, differs

    def _map_layers(self, name: str, source: str | None):
        """(letter, map copy) by priority, extents in flight, kind."""
        if source is not None:
            return [("#", self._differs(name)[1])], [], "clone"
        fam = self.families.get(name)
        with self.maps_lock:
            r = fam.restore if fam is not None else None
            if r is None:
                return [], [], "none"
            # During a restore the clone's delta map is still the one the
            # restore started from: what was pending then.
            return ([("#", r.pending.copy()), ("w", r.protected.copy()),
                     ("+", r.clone.delta.copy())], list(fam.guard.inflight), "restore")

    def restore(self, source: str) -> dict | None:
        fam: Family | None = self.families.peek(source)
        r = fam and (fam.restore or fam.last_restore)
        if r is None:
            return self._stored_restore(source)
        with self.maps_lock:
            pending = r.pending.count() if r.state != DONE else 0
            d = {"from": r.clone.name, "kind": r.kind, "state": r.state,
                 "protected": r.protected_mode,
                 "total_extents": r.total_extents, "pending_extents": pending,
                 "protected_extents": r.protected.count(), "on_demand_extents": r.on_demand,
                 "rate_limit_bytes_per_s": r.rate_limit, "error": r.error}
        d.update(_progress(r.progress, pending, fam.source.extent_size))
        return d


    def undo(self, source: str) -> dict | None:
        """The undo image of the source's last restore, if one is kept:
        ``capturing`` while the restore runs, ``kept`` once it is done,
        ``undoing`` while ``restore undo`` copies from it."""
        fam: Family | None = self.families.peek(source)
        r = fam and (fam.restore or fam.last_restore)
        if r is None:
            return self._stored_undo(source)
        undoing = r.undo_from is not None
        captured = r.undo_from.captured if undoing else r.captured
        if captured is None:
            return None
        with self.maps_lock:
            n = captured.count()
        size = fam.source.size
        state = "undoing" if undoing else "kept" if r.state == DONE else "capturing"
        return {"from": r.clone.name, "captured_extents": n,
                "bytes": min(n * fam.source.extent_size, size), "state": state}

    def _not_loaded(self, source: str) -> bool:
        """Is the source, or a clone of it, kept unserved?  Only then can
        its restore or undo point be in the metadata alone (read there,
        not for every source at every status or scrape)."""
        broken = self.volumes.broken
        return source in broken or any(rec.name in broken for rec in self.volumes.clones_of(source))

    def _stored_job(self, source: str) -> JobRecord | None:
        """The source's restore or undo row, if its clone is still the one
        it names (a row outlives its clone's delete, and the name may be
        reused since)."""
        if self.volumes.record(source).source is not None or not self._not_loaded(source):
            return None
        job = undo_image.job_of(self.families.committer, source)
        clone = self.volumes.records.get(job.clone) if job else None
        if clone is None or job.kind not in ("restore", "undo") or clone.source != source \
                or clone.created > job.started:
            return None
        return job

    def _stored_restore(self, source: str) -> dict | None:
        """The source's restore as its job row and stored maps say, when it
        is not loaded (the source kept unserved because its clone is
        missing, or a finished one whose clone was not loaded).  An
        unfinished one cannot go on: ``paused`` with the error that says
        why, as a restore paused on an error in memory."""
        job = self._stored_job(source)
        if job is None:
            return None
        md = self.families.committer.md
        done = job.state == DONE
        if not done:
            protected = md.map_count(source, PROTECTED) or 0
        elif job.protected_extents is None:  # finished before schema version 4
            protected = md.map_count(job.clone, DELTA) or 0
        else:
            protected = job.protected_extents
        return {"from": job.clone, "kind": job.kind, "state": DONE if done else PAUSED,
                "protected": job.protected, "total_extents": job.total_extents,
                "pending_extents": 0 if done else md.map_count(source, PENDING) or 0,
                "protected_extents": protected,
                "on_demand_extents": job.on_demand, "rate_limit_bytes_per_s": job.rate_limit,
                "error": None if done else job.error or self.volumes.error_of(source)
                or "not loaded",
                "copied_bytes": job.copied_bytes, "rate_bytes_per_s": 0, "eta_s": None}

    def _stored_undo(self, source: str) -> dict | None:
        """A point kept in the metadata only (its clone, or the source,
        was not loaded): ``kept``, as commands that would drop it say."""
        job = self._stored_job(source)
        if job is None or not job.undo or job.state != DONE:  # (undo.stored_point's)
            return None
        rec = self.volumes.record(source)
        n = self.families.committer.md.map_count(source, CAPTURED) or 0
        return {"from": job.clone, "captured_extents": n,
                "bytes": min(n * rec.extent_size, rec.size), "state": "kept"}


def _progress(p: Progress, remaining_extents: int, extent_size: int) -> dict:
    rate = p.rate()
    return {"copied_bytes": p.copied_bytes, "rate_bytes_per_s": round(rate),
            "eta_s": round(remaining_extents * extent_size / rate, 1) if rate > 0 else None}


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0
