"""The daemon's engine: state directory, volumes, jobs, control server.

Lives inside the nbdkit process.  ``Engine.__init__`` runs in the plugin's
``config_complete`` (before nbdkit forks: no threads); ``start`` runs in
``after_fork`` and starts the asyncio thread that serves the control socket
and runs background jobs; ``stop`` runs in ``cleanup``.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time

from . import remote, units
from . import volume as vf
from .commit import Committer
from .errors import AlreadyExists, Busy, InvalidArgument, LuncloneError, NotFound
from .iopath import Volume
from .lifecycle import Lifecycle
from .metadata import Metadata, VolumeRecord
from .store import FileStore, Store

log = logging.getLogger("lunclone.engine")

LOCK_NAME = "lock"
VOLUME_DIR = "volumes"


def lock_state_dir(fd: int, state_dir: str) -> None:
    """flock the state directory's lock file, or Busy naming the holder's pid."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        raise Busy(f"state directory {state_dir} is in use by another lunclone "
                   f"daemon (pid {holder or 'unknown'}); stop it first or use "
                   "another --state-dir") from None


class StateDirLock:
    """An exclusive flock on the state directory, held for the daemon's life."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, LOCK_NAME)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            lock_state_dir(self.fd, state_dir)
        except Busy:
            os.close(self.fd)
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)


class Engine:
    def __init__(self, state_dir: str, run_dir: str, nbd_socket: str | None = None,
                 control_group: str | None = None, tcp: str | None = None, tls: bool = False,
                 remote_depth: int = 0, remote_timeout: float = 0.0,
                 remote_connections: int = 0):
        self.state_dir = os.path.abspath(state_dir)
        self.run_dir = os.path.abspath(run_dir)
        self.nbd_socket = nbd_socket or os.path.join(self.run_dir, "nbd.sock")
        self.control_socket = os.path.join(self.run_dir, "control.sock")
        self.control_group = control_group
        self.tcp, self.tls = tcp, tls
        self.remote_depth = remote_depth or remote.DEFAULT_DEPTH
        self.remote_timeout = remote_timeout or remote.REQUEST_TIMEOUT
        self.remote_connections = remote_connections or remote.DEFAULT_CONNECTIONS
        vf.make_dirs(os.path.join(self.state_dir, VOLUME_DIR))
        self.lock = StateDirLock(self.state_dir)
        self.md = Metadata(self.state_dir)
        vf.fsync_dir(self.state_dir)  # the lock file and the database, if new
        self.records: dict[str, VolumeRecord] = {}
        self.volumes: dict[str, Volume] = {}
        self.broken: dict[str, str] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self.started = time.time()
        self.maps_lock = threading.RLock()
        self.committer = Committer(self.md, self.maps_lock)
        self.lifecycle = Lifecycle(self)
        for rec in self.md.volumes():
            self._load_volume(rec)
        self.lifecycle.load()
        # Last: a refusal above stays one line, without this warning before it.
        self.io_flusher = set_io_flusher()

    # -- volumes ---------------------------------------------------------
    def volume_path(self, name: str) -> str:
        return os.path.join(self.state_dir, VOLUME_DIR, f"{name}.img")

    def _load_volume(self, rec: VolumeRecord) -> None:
        """Open a volume's file; a damaged one is refused, the rest served.
        A remote clone's connection is made in the background (``start``):
        a remote that is away does not stop the daemon."""
        self.records[rec.name] = rec
        if rec.remote:
            store: Store = self._remote_store(rec.name, rec.remote, rec.size)
            self.volumes[rec.name] = Volume(rec.name, store, rec.size, rec.extent_size)
            return
        path = self.volume_path(rec.name)
        try:
            st = os.stat(path)
            if st.st_size != rec.size:
                raise LuncloneError(f"file {path} is {st.st_size} bytes, expected {rec.size}")
            self.volumes[rec.name] = Volume(rec.name, FileStore(path), rec.size, rec.extent_size)
        except (OSError, LuncloneError) as e:
            msg = e.message if isinstance(e, LuncloneError) else f"{path}: {e.strerror}"
            log.error("volume %s not served: %s", rec.name, msg)
            self.broken[rec.name] = msg

    def unserve(self, name: str, why: str) -> None:
        """Stop serving a volume at start-up (``why`` is shown in status and
        to a client that opens it); its record and file stay."""
        vol = self.volumes.pop(name, None)
        if vol is not None:
            vol.close()
        self.broken[name] = why

    def serve_again(self, name: str) -> None:
        """Open an unserved volume again (``restore resume``)."""
        self.broken.pop(name, None)
        self._load_volume(self.records[name])
        vol = self.volumes.get(name)
        if vol is not None:
            vol.store.start()

    def _remote_store(self, name: str, uri: str, size: int) -> remote.NbdStore:
        return remote.NbdStore(name, uri, size, self.remote_depth, self.remote_timeout,
                               self.remote_connections)

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

    def get_volume(self, name: str) -> Volume:
        vol = self.volumes.get(name)
        if vol is None:
            if name in self.broken:
                raise NotFound(f"volume {name!r} is not served: {self.broken[name]}")
            raise NotFound(f"no volume named {name!r}; see 'lunclone list'")
        return vol

    def create_volume(self, name: str, size, extent_size=None) -> dict:
        units.check_name(name)
        size = units.check_volume_size(units.parse_size(size))
        extent = units.check_extent_size(
            units.parse_size(extent_size) if extent_size else units.DEFAULT_EXTENT)
        if name in self.records:
            raise AlreadyExists(f"a volume named {name!r} exists already")
        path = self.volume_path(name)
        if os.path.exists(path):
            raise AlreadyExists(f"{path} exists but is not a known volume; move it away")
        try:
            vf.create_sparse(path, size)
        except OSError as e:
            raise vf.no_space_guard(e) from e
        rec = VolumeRecord(name, size, extent, created=time.time())
        try:
            with self.md.transaction() as tx:
                tx.put_volume(rec)
        except BaseException:
            vf.remove(path)
            raise
        self._load_volume(rec)
        log.info("created volume %s (%d bytes, extent %d)", name, size, extent)
        return self.describe(name)

    async def delete_volume(self, name: str, force: bool = False) -> dict:
        async with self.lifecycle.admin:
            return await self._delete_volume(name, force)

    async def _delete_volume(self, name: str, force: bool) -> dict:
        units.check_name(name)
        rec = self.records.get(name)
        if rec is None:
            raise NotFound(f"no volume named {name!r}; see 'lunclone list'")
        if rec.source is not None and rec.source in self.lifecycle.families:
            return await self.lifecycle.delete_clone_locked(name)
        fam = self.lifecycle.families.get(name)
        if fam is not None and fam.restore is not None:
            raise Busy(f"volume {name!r} is being restored; wait for the restore to finish")
        vol = self.volumes.get(name)
        if vol is not None and vol.connections:
            raise Busy(f"volume {name!r} has {vol.connections} open connection(s); "
                       "detach or disconnect its clients first")
        if fam is not None:
            if not force:
                raise Busy(f"volume {name!r} has clones ({', '.join(sorted(fam.clones))}); "
                           "delete them first or use --force")
            for clone in list(fam.clones):
                await self.lifecycle.delete_clone_locked(clone)
        with self.committer.transaction() as tx:
            if vol is not None and vol.connections:  # under the lock: none can slip in
                raise Busy(f"volume {name!r} has {vol.connections} open connection(s); "
                           "detach or disconnect its clients first")
            tx.delete_volume(name)
            tx.then(lambda: self.volumes.pop(name, None))
        self.forget_volume(name, vol)
        log.info("deleted volume %s", name)
        return {"deleted": name}

    def forget_volume(self, name: str, vol: Volume | None = None) -> None:
        """Drop a deleted volume from memory, close it (``vol``, if it was
        taken out of ``volumes`` already) and remove its file (for good: its
        directory is fsynced, a power cut does not bring it back)."""
        self.records.pop(name, None)
        self.broken.pop(name, None)
        vol = self.volumes.pop(name, None) or vol
        if vol is not None:
            with self.committer.commit_lock, self.maps_lock:
                self.committer.forget_fd(vol.fd)  # the number may be reused
                vol.close()
        vf.remove(self.volume_path(name), missing_ok=True)

    # -- views -----------------------------------------------------------
    def export_uri(self, name: str) -> str:
        if self.tcp:
            host, _, port = self.tcp.rpartition(":")
            return f"{'nbds' if self.tls else 'nbd'}://{host or 'localhost'}:{port}/{name}"
        return f"nbd+unix:///{name}?socket={self.nbd_socket}"

    def describe(self, name: str) -> dict:
        rec = self.records.get(name)
        if rec is None:
            raise NotFound(f"no volume named {name!r}; see 'lunclone list'")
        vol = self.volumes.get(name)
        return {
            "name": rec.name,
            "size": rec.size,
            "extent_size": rec.extent_size,
            "export": self.export_uri(rec.name),
            "allocated": _allocated(vol.path) if vol and vol.path else None,
            "remote": rec.remote,
            "connections": vol.connections if vol else 0,
            "error": self.broken.get(name) or (
                self.committer.failed_fds.get(vol.fd) if vol is not None and vol.fd >= 0 else None),
            "source": rec.source,
            "clone_state": rec.clone_state,
            "clones": self.lifecycle.describe_clones(name),
            "restore": self.lifecycle.describe_restore(name),
        }

    def list_volumes(self) -> list[dict]:
        return [self.describe(n) for n in sorted(self.records)]

    def export_names(self) -> list[str]:
        return sorted(self.volumes)

    # -- connections (called from nbdkit threads) ------------------------
    def open_export(self, name: str, readonly: bool) -> Volume:
        """Look up and count in one step under the lock: a delete that
        found no connection cannot be followed by one."""
        with self.maps_lock:
            vol = self.get_volume(name)
            vol.connections += 1
        return vol

    def close_export(self, vol: Volume) -> None:
        with self.maps_lock:
            vol.connections -= 1

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Start the asyncio thread (control server, jobs); after nbdkit forks."""
        from .control import ControlServer
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self._server = ControlServer(self, self.control_socket, self.control_group)
                self.loop.run_until_complete(self._server.start())
                self.lifecycle.start_jobs()
            except BaseException as e:
                log.exception("engine start failed")
                errors.append(e)
                ready.set()
                return
            ready.set()
            notify_systemd(b"READY=1\nSTATUS=serving")
            self.loop.run_forever()
            self.loop.run_until_complete(self._server.close())
            self.loop.run_until_complete(self.lifecycle.close())
            self.loop.close()

        self.committer.start()
        for vol in self.volumes.values():
            vol.store.start()
        self._thread = threading.Thread(target=run, name="lunclone-loop", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        log.info("engine started: state %s, run %s", self.state_dir, self.run_dir)

    def stop(self) -> None:
        """Commit everything, stop the loop, remove both sockets."""
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
        try:
            self.committer.stop()
        except Exception:
            log.exception("final metadata commit failed")
        for vol in self.volumes.values():
            try:
                vol.store.flush()
            except OSError as e:
                log.error("flush of %s failed at shutdown: %s", vol.name, e)
            vol.close()
        self.md.close()
        for path in (self.control_socket, self.nbd_socket):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.lock.release()
        log.info("engine stopped")


def set_io_flusher() -> bool:
    """prctl(PR_SET_IO_FLUSHER): memory reclaim must not wait on our own
    writes when the kernel NBD client on this host is served by us.  Set
    before nbdkit starts its threads, which inherit it."""
    import ctypes
    import ctypes.util
    PR_SET_IO_FLUSHER = 57
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.warning("PR_SET_IO_FLUSHER not set: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def notify_systemd(message: bytes) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""
    import socket
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(path)
            s.sendall(message)
        except OSError as e:
            log.warning("sd_notify failed: %s", e)


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0
