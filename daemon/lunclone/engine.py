"""The daemon's engine: the parts of the daemon, put together and started.

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
import sys
import threading
import time
from collections.abc import Callable

from . import remote, undo, units
from . import volume as vf
from .clones import Clones
from .commit import Committer
from .errors import Busy, NotFound, WrongState
from .families import Families
from .iopath import Volume
from .jobs import JobRunner
from .metadata import Metadata
from .policy import DONE, undo_refusal
from .restores import Restores
from .status import Status
from .volumes import VOLUME_DIR, RemoteOptions, VolumeTable

log = logging.getLogger("lunclone.engine")

LOCK_NAME = "lock"


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
    """The composition root: builds the parts, starts and stops them.

    ``volumes`` (the volume table), ``families`` (who is a clone of whom),
    ``clones`` and ``restores`` (the admin commands), ``jobs`` (background
    copies), ``status`` (what status and metrics show), ``committer`` (group
    commit; it owns the maps lock), ``md`` (SQLite).  Admin commands run one
    at a time under ``admin``.
    """

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
        vf.make_dirs(os.path.join(self.state_dir, VOLUME_DIR))
        self.lock = StateDirLock(self.state_dir)
        self.md = Metadata(self.state_dir)
        vf.fsync_dir(self.state_dir)  # the lock file and the database, if new
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self.started = time.time()
        self.stopping = False
        # Set by the plugin: asks nbdkit to exit (nbdkit.shutdown).
        self.exit_hook: Callable[[], None] | None = None
        self.committer = Committer(self.md)
        self.volumes = VolumeTable(self.state_dir, self.md, self.committer, RemoteOptions(
            remote_depth or remote.DEFAULT_DEPTH, remote_timeout or remote.REQUEST_TIMEOUT,
            remote_connections or remote.DEFAULT_CONNECTIONS))
        self.families = Families(self.volumes, self.committer)
        self.jobs = JobRunner()
        self.admin = asyncio.Lock()  # one admin command at a time
        self.clones = Clones(self.volumes, self.families, self.jobs, self.admin)
        self.restores = Restores(self.volumes, self.families, self.jobs, self.admin, self.clones,
                                 self.state_dir)
        self.status = Status(self.volumes, self.families, self.export_uri)
        self.volumes.load_all()
        self.families.load_all()
        self.restores.load_all()
        self.families.distrust_absent()  # before any client: see its docstring
        # Last: a refusal above stays one line, without this warning before it.
        self.io_flusher = set_io_flusher()
        sys.setswitchinterval(GIL_SWITCH_S)

    # -- plain volumes -----------------------------------------------------
    def create_volume(self, name: str, size, extent_size=None) -> None:
        self.volumes.create(name, size, extent_size)

    async def delete_volume(self, name: str, force: bool = False) -> None:
        """A clone, or a source (with ``force``: its clones first)."""
        async with self.admin:
            units.check_name(name)
            rec = self.volumes.record(name)
            if rec.source is not None:
                await self._delete_clone(name, rec.source, force)
                return
            fam = self.families.get(name)
            if fam is not None and fam.restore is not None:
                raise WrongState(f"volume {name!r} is being restored; wait for the restore "
                                 "to finish")
            self.volumes.check_unused(name, self.volumes.served.get(name))
            # Every clone's record, loaded or not: one left behind would be
            # taken as a clone of a new volume of the same name.
            clones = sorted(r.name for r in self.volumes.clones_of(name))
            if clones and not force:
                raise WrongState(f"volume {name!r} has clones ({', '.join(clones)}); "
                                 "delete them first or use --force")
            for clone in clones:  # before any is deleted
                self.volumes.check_unused(clone, self.volumes.served.get(clone))
            for clone in clones:
                await self._delete_clone(clone, name, force=True, with_source=True)
            self.volumes.delete(name)
            undo.remove(self.state_dir, name)

    async def delete_clone(self, name: str, force: bool = False) -> None:
        """``clone delete``: ``delete`` of a clone, by that name."""
        async with self.admin:
            units.check_name(name)
            rec = self.volumes.records.get(name)
            if rec is None:
                raise NotFound(f"no clone named {name!r}; see 'lunclone list'")
            if rec.source is None:
                raise NotFound(f"{name!r} is not a clone; see 'lunclone status {name}'")
            await self._delete_clone(name, rec.source, force)

    async def _delete_clone(self, name: str, source: str, force: bool,
                            with_source: bool = False) -> None:
        """A clone of its source's family, or, if the family did not load it
        (its file, or its source's, was missing at start-up), its record
        and an undo point that needs it (refused without ``force``, as
        ``Clones.delete_locked`` refuses one in memory).  Never the clone
        of an unfinished restore, unless the source goes too
        (``with_source``): its pending extents' data is only there."""
        fam = self.families.peek(source)
        if fam is not None and name in fam.clones:
            await self.clones.delete_locked(name, force)
            return
        self.volumes.check_unused(name, self.volumes.served.get(name))
        job = undo.job_of(self.committer, source)
        if (not with_source and job is not None and job.clone == name
                and job.kind in ("restore", "undo") and job.state != DONE):
            raise WrongState(f"clone {name} is the source of the unfinished restore of "
                             f"{source}: its data is only there; bring its file back, then "
                             f"run 'lunclone restore resume {source}'")
        point = undo.stored_point(self.committer, source=source, clone=name)
        if point is not None and not force:
            raise WrongState(undo_refusal(point.source, name) + ", or use --force")
        self.volumes.delete(name, point)
        if point is not None:
            undo.remove(self.state_dir, point.source)
            log.warning("undo point of %s dropped (--force on clone %s)", point.source, name)

    def export_uri(self, name: str) -> str:
        if self.tcp:
            host, _, port = self.tcp.rpartition(":")
            return f"{'nbds' if self.tls else 'nbd'}://{host or 'localhost'}:{port}/{name}"
        return f"nbd+unix:///{name}?socket={self.nbd_socket}"

    # -- connections (called from nbdkit threads) ------------------------
    def export_names(self) -> list[str]:
        return self.volumes.export_names()

    def open_export(self, name: str, readonly: bool) -> Volume:
        if self.stopping:
            raise Busy("the daemon is stopping; connect to the next one")
        self.families.load_maps_of(name)  # before the client's first request
        return self.volumes.open_export(name, readonly)

    def close_export(self, vol: Volume) -> None:
        self.volumes.close_export(vol)

    # -- start and stop ------------------------------------------------------
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
                self.loop.run_until_complete(self._start_jobs())
            except BaseException as e:
                log.exception("engine start failed")
                errors.append(e)
                ready.set()
                return
            ready.set()
            notify_systemd(b"READY=1\nSTATUS=serving")
            self.loop.run_forever()
            self.loop.run_until_complete(self._server.close())
            self.clones.stop()
            self.loop.run_until_complete(self.jobs.close())
            self.loop.close()

        self.committer.start()
        self.volumes.start()
        self._thread = threading.Thread(target=run, name="lunclone-loop", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        log.info("engine started: state %s, run %s", self.state_dir, self.run_dir)

    async def _start_jobs(self) -> None:
        self.jobs.start(asyncio.get_running_loop())
        self.clones.start()
        self.restores.start()

    def shutdown(self) -> dict:
        """``lunclone shutdown``: refuse new clients, hand the connected ones
        back (drain.py says why), and once nbdkit has closed them, ask it
        to exit."""
        from .drain import release_clients
        self.stopping = True
        port = int(self.tcp.rpartition(":")[2]) if self.tcp else None
        released = release_clients(self.nbd_socket, port)
        if self.exit_hook is not None:
            threading.Thread(target=self._exit_when_closed, args=(released,),
                             name="lunclone-shutdown", daemon=True).start()
        return {"released": len(released)}

    def _exit_when_closed(self, released: set[str]) -> None:
        from .drain import wait_closed
        if not wait_closed(released, SHUTDOWN_WAIT_S):
            log.warning("stopping: clients still connected after %d s; exiting anyway",
                        SHUTDOWN_WAIT_S)
        self.exit_hook()

    def stop(self) -> None:
        """Commit everything, stop the loop, remove both sockets."""
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
        try:
            self.committer.stop()
        except Exception:
            log.exception("final metadata commit failed")
        self.volumes.close()
        self.md.close()
        for path in (self.control_socket, self.nbd_socket):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.lock.release()
        log.info("engine stopped")


# How long ``shutdown`` waits for nbdkit to finish its clients' requests.
SHUTDOWN_WAIT_S = 40

# How long a thread waiting for the GIL waits before the holder is asked to
# drop it (Python's default is 5 ms).  The committer thread, whose commit
# every first write into an extent waits for, takes the GIL about four
# times per commit (each SQLite call releases it) against nbdkit's request
# threads; at 5 ms each a commit stretched to several ms and host writes
# during a restore waited for it.  1 ms: 4k random I/O during a restore
# went from about 0.77 to 0.83 of idle, plain 4k random writes unchanged
# (A/B of 5 alternated rounds: 0.993).
GIL_SWITCH_S = 0.001


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

