"""Hand the daemon's NBD clients back before it exits.

nbdkit 1.32 waits, on SIGTERM, for every client to disconnect, and a
worker blocked reading an idle connection never sees the signal: with the
kernel's NBD client attached (its connections stay open for good), a
``systemctl stop`` would hang until systemd's SIGKILL.  So the daemon is
asked to stop first (``lunclone shutdown``, the unit's ExecStop): new
connections are refused, and each client connection is shut down for
reading.  nbdkit then reads the requests already in the socket, answers
them and every request in flight, sees end of file and closes; a request
the kernel sends after that fails to send, and the kernel keeps it for the
next daemon (the attach supervisor reconnects the device).  Nothing the
kernel sent is lost and nothing is answered twice.
"""
from __future__ import annotations

import logging
import os
import socket

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


def release_clients(nbd_socket: str, tcp_port: int | None = None) -> int:
    """Shut every NBD client connection of this process down for reading;
    returns how many.  Found through /proc/self/fd: nbdkit owns them."""
    released = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{entry}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(entry)))
        except OSError:
            continue                           # closed meanwhile
        with sock:
            if sock.type == socket.SOCK_STREAM and _served_address(sock, nbd_socket,
                                                                   tcp_port):
                try:
                    sock.shutdown(socket.SHUT_RD)
                    released += 1
                except OSError:
                    pass
    log.info("stopping: %d NBD client connection(s) handed back", released)
    return released
