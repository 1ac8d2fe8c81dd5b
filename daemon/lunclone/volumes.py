"""The volume table: every volume the daemon knows, by name.

A volume has a record (``metadata.VolumeRecord``) and, if it could be
opened, a served ``Volume``; one that could not is kept with the reason
(``broken``), shown in status and to a client that opens it.  Files live in
``<state>/volumes/<name>.img``; a remote clone's data is behind an NBD URI.

Clones and restores do not live here: ``families`` owns which volume is a
clone of which, and the admin modules (``clones``, ``restores``) change that.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

from . import remote, undo, units
from . import volume as vf
from .commit import Committer
from .errors import AlreadyExists, Busy, InvalidArgument, LuncloneError, NotFound
from .iopath import Volume
from .metadata import CAPTURED, JobRecord, Metadata, VolumeRecord
from .store import FileStore, Store

log = logging.getLogger("lunclone.volumes")

VOLUME_DIR = "volumes"


@dataclasses.dataclass(frozen=True)
class RemoteOptions:
    """How remote clones are reached (``serve --remote-*``)."""
    depth: int = remote.DEFAULT_DEPTH
    timeout: float = remote.REQUEST_TIMEOUT
    connections: int = remote.DEFAULT_CONNECTIONS


class VolumeTable:
    """Records, open volumes and refusals, all keyed by volume name."""

    def __init__(self, state_dir: str, md: Metadata, committer: Committer,
                 remote_options: RemoteOptions):
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, VOLUME_DIR)
        self.md = md
        self.committer = committer
        self.maps_lock: threading.RLock = committer.maps_lock
        self.remote_options = remote_options
        self.records: dict[str, VolumeRecord] = {}
        self.served: dict[str, Volume] = {}
        self.broken: dict[str, str] = {}  # name -> why it is not served

    def path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.img")

    # -- opening ---------------------------------------------------------------
    def load_all(self) -> None:
        for rec in self.md.volumes():
            self.load(rec)

    def load(self, rec: VolumeRecord) -> None:
        """Open a volume's file; a damaged one is refused, the rest served.
        A remote clone's connection is made in the background (``start``):
        a remote that is away does not stop the daemon."""
        self.records[rec.name] = rec
        if rec.remote:
            store: Store = self._remote_store(rec.name, rec.remote, rec.size)
            self.served[rec.name] = Volume(rec.name, store, rec.size, rec.extent_size)
            return
        path = self.path(rec.name)
        try:
            st = os.stat(path)
            if st.st_size != rec.size:
                raise LuncloneError(f"file {path} is {st.st_size} bytes, expected {rec.size}")
            self.served[rec.name] = Volume(rec.name, FileStore(path), rec.size, rec.extent_size)
        except (OSError, LuncloneError) as e:
            msg = e.message if isinstance(e, LuncloneError) else f"{path}: {e.strerror}"
            log.error("volume %s not served: %s", rec.name, msg)
            self.broken[rec.name] = msg

    def unserve(self, name: str, why: str) -> None:
        """Stop serving a volume no client has opened or written to (at
        start-up, or just opened again under the maps lock): ``why`` is shown
        in status and to a client that opens it; its record and file stay."""
        vol = self.served.pop(name, None)
        if vol is not None:
            vol.close()
        self.broken[name] = why

    def serve_again(self, name: str) -> None:
        """Open an unserved volume again (``restore resume``).  One that is
        open is kept: a second ``Volume`` would leak the first one's
        descriptor, and the first one's clients would write past the
        second one's policy."""
        self.broken.pop(name, None)
        if name in self.served:
            return
        self.load(self.records[name])
        vol = self.served.get(name)
        if vol is not None:
            vol.store.start()

    def _remote_store(self, name: str, uri: str, size: int) -> remote.NbdStore:
        o = self.remote_options
        return remote.NbdStore(name, uri, size, o.depth, o.timeout, o.connections)

    def open_remote(self, name: str, uri: str, size: int) -> remote.NbdStore:
        """A new remote clone's store, connected and checked, or one clear error."""
        if not uri.startswith(remote.SCHEMES):
            raise InvalidArgument(f"--remote {uri!r}: give an NBD URI ("
                                  f"{', '.join(s.rstrip(':/') for s in remote.SCHEMES)})")
        for rec in self.records.values():
            if rec.remote == uri:
                raise AlreadyExists(f"{uri} is already the clone {rec.name}")
        store = self._remote_store(name, uri, size)
        store.start()
        try:
            store.wait_connected()
        except OSError as e:
            store.close()
            raise InvalidArgument(f"cannot keep a clone on {uri}: {e.strerror}") from None
        return store

    def new_file(self, name: str, size: int) -> str:
        """A new sparse file for a volume (its path), or one clear error."""
        path = self.path(name)
        if os.path.exists(path):
            raise AlreadyExists(f"{path} exists but is not a known volume; move it away")
        try:
            vf.create_sparse(path, size)
        except OSError as e:
            raise vf.no_space_guard(e) from e
        return path

    # -- lookups -----------------------------------------------------------------
    def get(self, name: str) -> Volume:
        vol = self.served.get(name)
        if vol is None:
            if name in self.broken:
                raise NotFound(f"volume {name!r} is not served: {self.broken[name]}")
            raise NotFound(f"no volume named {name!r}; see 'lunclone list'")
        return vol

    def record(self, name: str) -> VolumeRecord:
        rec = self.records.get(name)
        if rec is None:
            raise NotFound(f"no volume named {name!r}; see 'lunclone list'")
        return rec

    def clones_of(self, source: str) -> list[VolumeRecord]:
        """Every clone record of ``source``, loaded or not (a clone whose
        file was missing at start-up is back at the next one)."""
        return [rec for rec in self.records.values() if rec.source == source]

    def check_new_name(self, name: str) -> None:
        units.check_name(name)
        if name in self.records:
            raise AlreadyExists(f"a volume named {name!r} exists already")

    def export_names(self) -> list[str]:
        return sorted(self.served)

    def error_of(self, name: str) -> str | None:
        """Why a volume is not served, or why its write-back failed."""
        vol = self.served.get(name)
        return self.broken.get(name) or (
            self.committer.failed_fds.get(vol.fd) if vol is not None and vol.fd >= 0 else None)

    # -- plain volumes -------------------------------------------------------------
    def create(self, name: str, size, extent_size=None) -> None:
        self.check_new_name(name)
        size = units.check_volume_size(units.parse_size(size))
        extent = units.check_extent_size(
            units.parse_size(extent_size) if extent_size else units.DEFAULT_EXTENT)
        path = self.new_file(name, size)
        rec = VolumeRecord(name, size, extent, created=time.time())
        try:
            with self.md.transaction() as tx:
                tx.put_volume(rec)
        except BaseException:
            vf.remove(path)
            raise
        self.load(rec)
        log.info("created volume %s (%d bytes, extent %d)", name, size, extent)

    def delete(self, name: str, point: JobRecord | None = None) -> None:
        """Delete a volume with no clones and no restore (the caller checks),
        and with it the undo ``point`` (a stored one) that needs it."""
        vol = self.served.get(name)
        self.check_unused(name, vol)
        with self.committer.transaction() as tx:
            self.check_unused(name, vol)  # under the lock: none can slip in
            tx.delete_volume(name)
            if point is not None:
                undo.forget_stored_point(point, tx)
            tx.delete_bitmap(name, CAPTURED)  # its undo image's map, if any
            tx.delete_job(name)  # and its last restore's row
            tx.then(lambda: self.served.pop(name, None))
        self.forget(name, vol)
        log.info("deleted volume %s", name)

    @staticmethod
    def check_unused(name: str, vol: Volume | None) -> None:
        if vol is not None and vol.connections:
            raise Busy(f"volume {name!r} has {vol.connections} open connection(s); "
                       "detach or disconnect its clients first")

    def forget(self, name: str, vol: Volume | None = None) -> None:
        """Drop a deleted volume from memory, close it (``vol``, if it was
        taken out of ``served`` already) and remove its file (for good: its
        directory is fsynced, a power cut does not bring it back)."""
        self.records.pop(name, None)
        self.broken.pop(name, None)
        vol = self.served.pop(name, None) or vol
        if vol is not None:
            with self.committer.commit_lock, self.maps_lock:
                self.committer.forget_fd(vol.fd)  # the number may be reused
                vol.close()
        vf.remove(self.path(name), missing_ok=True)

    # -- connections (nbdkit threads) ------------------------------------------------
    def open_export(self, name: str, readonly: bool) -> Volume:
        """Look up and count in one step under the lock: a delete that
        found no connection cannot be followed by one."""
        with self.maps_lock:
            vol = self.get(name)
            vol.connections += 1
        return vol

    def close_export(self, vol: Volume) -> None:
        with self.maps_lock:
            vol.connections -= 1

    # -- start and stop ----------------------------------------------------------------
    def start(self) -> None:
        for vol in self.served.values():
            vol.store.start()

    def close(self) -> None:
        for vol in self.served.values():
            try:
                vol.store.flush()
            except OSError as e:
                log.error("flush of %s failed at shutdown: %s", vol.name, e)
            vol.close()
