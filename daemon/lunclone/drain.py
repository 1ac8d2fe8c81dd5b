"""Hand the daemon's NBD clients back before it exits.

nbdkit 1.32 waits, on SIGTERM, for every client to disconnect, and a
worker blocked reading an idle connection never sees the signal: with the
kernel's NBD client attached (its connections stay open for good), a
``systemctl stop`` would hang until systemd's SIGKILL.  So the daemon is
asked to stop first (``lunclone shutdown``, the unit's ExecStop): new
connections are refused, and each client connection is shut down both
ways.  Both, because nbdkit 1.32 answers a request it has read but not
started with ESHUTDOWN once its connection is closing, and the kernel
turns any error reply into an I/O error for the filesystem: with the
socket's sending side shut, no such reply can reach the client.

What the kernel's NBD client then does: it reads end of file, marks the
connection dead and holds new I/O for the next daemon (the attach
supervisor reconnects the device).  A request it had sent and not seen
answered is re-sent at its 30 s timer (docs/ATTACH.md); the daemon may
have run it already, which for the same write to the same place changes
nothing.  No request gets an error.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def _served_address(sock: socket.socket, nbd_socket: str, tcp_port: int | None) -> bool:
    """Is ``sock`` a connection a client made to our NBD listener?"""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False                       # the listener itself
        name = sock.getsockname()
    except OSError:
        return False
    if sock.family == socket.AF_UNIX:
        return name in (nbd_socket, nbd_socket.encode())
    if sock.family in (socket.AF_INET, socket.AF_INET6) and tcp_port is not None:
        return name[1] == tcp_port
    return False


def _fd_links() -> Iterator[tuple[int, str]]:
    """(fd, what it is, e.g. "socket:[inode]") for each open fd of this process."""
    for entry in os.listdir("/proc/self/fd"):
        try:
            yield int(entry), os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue                           # closed meanwhile


def client_sockets(nbd_socket: str, tcp_port: int | None = None
                   ) -> list[tuple[str, socket.socket]]:
    """(inode, duplicate) of this process's NBD client connections (nbdkit
    owns the originals; /proc/self/fd finds them).  The caller closes them."""
    found = []
    for fd, link in _fd_links():
        if not link.startswith("socket:"):
            continue
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue                           # closed meanwhile
        if sock.type == socket.SOCK_STREAM and _served_address(sock, nbd_socket, tcp_port):
            found.append((link, sock))
        else:
            sock.close()
    return found


def release_clients(nbd_socket: str, tcp_port: int | None = None) -> set[str]:
    """Shut every NBD client connection down both ways; returns them (as
    "socket:[inode]")."""
    released = set()
    for link, sock in client_sockets(nbd_socket, tcp_port):
        with sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                released.add(link)
            except OSError:
                pass
    log.info("stopping: %d NBD client connection(s) handed back", len(released))
    return released


def wait_closed(released: set[str], timeout: float) -> bool:
    """Until nbdkit has closed the released connections (its workers finish
    the requests they are running first); False at the timeout.  Others
    do not count: a client that connects now is refused and goes."""
    deadline = time.monotonic() + timeout
    while any(link in released for _, link in _fd_links()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
