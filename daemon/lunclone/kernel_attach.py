"""Attach a volume through the kernel's NBD client, and keep it attached
across daemon restarts.

``connect``: open N connections to the daemon's NBD socket, let libnbd do
the NBD handshake on each (fixed newstyle, NBD_OPT_GO, simple replies: the
kernel reads no other kind), keep a duplicate of each socket, and hand
them to the kernel over netlink with a backend identifier naming the
daemon's state directory and the volume.

``Supervisor``: a process per device that listens for the kernel's
LINK_DEAD events.  When the daemon goes away the kernel holds the device's
I/O (up to the dead-connection timeout); when the daemon serves again, the
supervisor checks that it serves the same state directory and gives the
device new sockets with RECONFIGURE.  The filesystem sees a pause, and an
error the daemon returns (ENOSPC, EIO) reaches it at once: no proxy
retries in between.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass

from . import netlink_nbd as nl
from .client import Client
from .errors import LuncloneError

log = logging.getLogger("lunclone.attach")

# How long the kernel holds I/O while no connection is live: longer than
# any restart, short enough that a daemon gone for good fails I/O in the end.
DEAD_CONN_TIMEOUT_S = 300
# Per-request timeout: 0, so the kernel never kills a healthy but slow
# connection and re-sends a write the daemon may still be running; a
# request lost with a dead connection is re-sent at its 30 s timer
# (docs/ATTACH.md, "What a restart costs the I/O").
REQUEST_TIMEOUT_S = 0
CONNECT_RETRY_S = 0.2
# A daemon that accepted nothing in this time (an exiting nbdkit leaves
# connections in its listen queue) is given up on, and tried again.
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake told about the export, in the kernel's terms."""
    size: int
    flags: int          # NBD transmission flags
    block_size: int     # the device's logical block size


def backend_identifier(state_dir: str, name: str) -> str:
    return f"lunclone:{state_dir}:{name}"


def served_state_dir(run_dir: str) -> str:
    with Client(run_dir, timeout=HANDSHAKE_TIMEOUT_S) as c:
        served = c.call("ping").get("state_dir")
    if served is None:
        raise LuncloneError(f"the daemon at {run_dir} is older than this lunclone "
                            "(its ping names no state directory); upgrade it")
    return served


def _negotiate(sock_path: str, name: str) -> tuple[socket.socket, ExportInfo]:
    """One connection in the transmission phase, and the export's info."""
    import nbd
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h = None
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.connect(sock_path)
        if not select.select([sock], [], [], HANDSHAKE_TIMEOUT_S)[0]:
            raise LuncloneError(f"the daemon at {sock_path} sent no NBD greeting in "
                                f"{HANDSHAKE_TIMEOUT_S:g} s")
        h = nbd.NBD()
        h.set_request_structured_replies(False)
        if hasattr(h, "set_request_extended_headers"):   # libnbd >= 1.20
            h.set_request_extended_headers(False)
        h.set_export_name(name)
        h.connect_socket(os.dup(sock.fileno()))           # libnbd owns and closes the dup
        info = ExportInfo(size=h.get_size(), flags=_flags(h),
                          block_size=_block_size(h.get_block_size(nbd.SIZE_MINIMUM)))
    except nbd.Error as e:
        sock.close()
        raise LuncloneError(f"NBD handshake for {name!r} failed: {e.string}") from None
    except BaseException:
        sock.close()
        raise
    finally:
        # Close libnbd's copy now, not when a traceback that holds this
        # frame is freed: a refused handshake must not stay connected.
        h = None
    sock.setblocking(True)          # libnbd made the shared file description non-blocking
    return sock, info


def _flags(h) -> int:
    """The transmission flags, rebuilt from what libnbd reports."""
    checks = ((nl.FLAG_READ_ONLY, h.is_read_only), (nl.FLAG_SEND_FLUSH, h.can_flush),
              (nl.FLAG_SEND_FUA, h.can_fua), (nl.FLAG_ROTATIONAL, h.is_rotational),
              (nl.FLAG_SEND_TRIM, h.can_trim), (nl.FLAG_SEND_WRITE_ZEROES, h.can_zero),
              (nl.FLAG_CAN_MULTI_CONN, h.can_multi_conn), (nl.FLAG_SEND_CACHE, h.can_cache),
              (nl.FLAG_SEND_FAST_ZERO, h.can_fast_zero))
    return nl.FLAG_HAS_FLAGS | sum(bit for bit, ask in checks if ask())


def _block_size(minimum: int) -> int:
    """A power of two in [512, 4096] (the kernel takes no other) that the
    server's minimum fits in."""
    bs = 512
    while bs < max(minimum, 1):
        bs <<= 1
    if bs > 4096:
        raise LuncloneError(f"the server's minimum block size {minimum} exceeds 4096")
    return bs


def open_connections(sock_path: str, name: str, count: int
                     ) -> tuple[list[socket.socket], ExportInfo]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock, info = _negotiate(sock_path, name)
            socks.append(sock)
        if count > 1 and not info.flags & nl.FLAG_CAN_MULTI_CONN:
            raise LuncloneError(f"the daemon does not allow several connections to {name!r}")
        return socks, info
    except BaseException:
        for s in socks:
            s.close()
        raise


def connect(run_dir: str, name: str, backend: str, connections: int,
            index: int | None) -> int:
    """CONNECT a new device for volume ``name``; returns its index."""
    socks, info = open_connections(os.path.join(run_dir, "nbd.sock"), name, connections)
    try:
        return nl.connect(socks, info.size, info.block_size, info.flags, REQUEST_TIMEOUT_S,
                          DEAD_CONN_TIMEOUT_S, backend, index)
    except nl.NbdError as e:
        raise LuncloneError(str(e)) from None
    finally:
        for s in socks:      # the kernel holds its own references now
            s.close()


def find_device(backend: str) -> int | None:
    """The index of the NBD device whose backend identifier is ``backend``."""
    for entry in os.listdir("/sys/block") if os.path.isdir("/sys/block") else []:
        if entry.startswith("nbd") and entry[3:].isdigit() and \
                nl.backend_of(int(entry[3:])) == backend:
            return int(entry[3:])
    return None


class Supervisor:
    """Keeps /dev/nbdN connected to the daemon serving ``backend``."""

    def __init__(self, run_dir: str, name: str, index: int, backend: str, connections: int):
        self.run_dir, self.name, self.index = run_dir, name, index
        self.backend, self.connections = backend, connections
        self.sock_path = os.path.join(run_dir, "nbd.sock")
        self.stopping = False

    def run(self, ready=None) -> None:
        """Until SIGTERM or the device is gone.  ``ready`` is called once the
        event socket listens (so no LINK_DEAD from then on is missed)."""
        signal.signal(signal.SIGTERM, self._stop)
        events = nl.LinkDeadEvents()
        try:
            if ready:
                ready()
            # A socket may have died before we listened (between CONNECT and
            # here, or while no supervisor ran): RECONFIGURE once; it only
            # replaces dead sockets, so with none dead it changes nothing.
            self.reconnect()
            while not self.stopping:
                if nl.backend_of(self.index) != self.backend:
                    log.info("/dev/nbd%d is no longer attached to %s: done", self.index,
                             self.backend)
                    return
                try:
                    readable, _, _ = select.select([events], [], [], 1.0)
                except InterruptedError:
                    continue
                if readable and self.index in set(events.read()):
                    self._drain(events)
                    self.reconnect()
        finally:
            events.close()

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _drain(self, events: nl.LinkDeadEvents) -> None:
        """One reconnect for the burst of events a restart makes (one per socket)."""
        while select.select([events], [], [], 0.05)[0]:
            list(events.read())

    def reconnect(self) -> bool:
        """New sockets for the dead ones, once the daemon serves again; False
        if stopped first.  A daemon serving another state directory is
        refused (the kernel would refuse it too) and waited past."""
        said = ""
        while not self.stopping and nl.backend_of(self.index) == self.backend:
            try:
                self._reconfigure()
                return True
            except Exception as e:     # whatever it is, the device waits: retry
                if str(e) != said:
                    log.warning("/dev/nbd%d waits for the daemon: %s", self.index, e)
                    said = str(e)
                time.sleep(CONNECT_RETRY_S)
        return False

    def _reconfigure(self) -> None:
        served = backend_identifier(served_state_dir(self.run_dir), self.name)
        if served != self.backend:
            raise LuncloneError(f"the daemon at {self.run_dir} serves {served!r}, "
                                f"/dev/nbd{self.index} is {self.backend!r}: "
                                "backend identifier mismatch; not reconnecting")
        socks, _ = open_connections(self.sock_path, self.name, self.connections)
        try:
            nl.reconfigure(self.index, socks, self.backend)
        finally:
            for s in socks:
                s.close()
        log.info("/dev/nbd%d connected (%d connection(s) offered)", self.index,
                 self.connections)
