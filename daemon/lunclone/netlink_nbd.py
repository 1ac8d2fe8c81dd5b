"""The kernel's NBD client, driven over its generic netlink family "nbd".

Four commands and one event (include/uapi/linux/nbd-netlink.h):
CONNECT hands already negotiated sockets to the kernel and returns the
device index; RECONFIGURE replaces the device's *dead* sockets (extra
sockets are dropped and reported as success); DISCONNECT ends it; STATUS
says which devices have a configuration; LINK_DEAD is multicast on
"nbd_mc_group" when a socket dies.

Rules read from drivers/block/nbd.c that shape the callers:
- the backend identifier (Linux >= 5.14) is shown in
  /sys/block/nbdN/backend, not in STATUS, and the kernel refuses a
  RECONFIGURE that does not repeat it;
- a socket fd is looked up in the calling process while the command runs:
  keep it open until the call returns, close it after;
- several sockets need NBD_FLAG_CAN_MULTI_CONN from the server;
- pyroute2 0.7 retries an EBUSY answer 30 x 0.3 s, so a busy index is
  refused before CONNECT is sent.

Written with pyroute2 (Debian's python3-pyroute2, 0.7.2 on Debian 12,
0.7.7 on 13); only API present in 0.7 and 0.9 is used.
"""
from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator, Sequence

try:
    from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket
    IMPORT_ERROR: str | None = None
except ImportError as e:   # the fuse-loop attach must still work without it
    IMPORT_ERROR = str(e)
    genlmsg = nla = object  # type: ignore[assignment,misc]
    NLA_F_NESTED = 0

FAMILY, VERSION, MCAST_GROUP = "nbd", 1, "nbd_mc_group"
CMD_CONNECT, CMD_DISCONNECT, CMD_RECONFIGURE, CMD_LINK_DEAD, CMD_STATUS = 1, 2, 3, 4, 5

# NBD transmission flags (include/uapi/linux/nbd.h, the NBD protocol).
FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FLAG_ROTATIONAL, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES = 1 << 4, 1 << 5, 1 << 6
FLAG_CAN_MULTI_CONN, FLAG_SEND_CACHE, FLAG_SEND_FAST_ZERO = 1 << 8, 1 << 10, 1 << 11


class NbdUnavailable(Exception):
    """No kernel NBD client to talk to (module or pyroute2 missing)."""


class NbdError(Exception):
    """The kernel refused a command; ``code`` is the errno."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class nbdmsg(genlmsg):  # type: ignore[misc,valid-type]
    """A message of the "nbd" family; attribute numbers are map positions."""
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),               # seconds
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),          # transmission flags
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),          # NBD_CFLAG_*
        ("NBD_ATTR_SOCKETS", "*sock_item"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),     # seconds
        ("NBD_ATTR_DEVICE_LIST", "*device_item"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sock_item(nla):  # type: ignore[misc,valid-type]
        header_type = 1        # every element is NBD_SOCK_ITEM; pyroute2 would number them
        nla_flags = NLA_F_NESTED
        nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_item(nla):  # type: ignore[misc,valid-type]
        header_type = 1        # NBD_DEVICE_ITEM
        nla_flags = NLA_F_NESTED
        nla_map = (("NBD_DEVICE_UNSPEC", "none"), ("NBD_DEVICE_INDEX", "uint32"),
                   ("NBD_DEVICE_CONNECTED", "uint8"))


def _open() -> "GenericNetlinkSocket":
    if IMPORT_ERROR is not None:
        raise NbdUnavailable(f"pyroute2 is not installed ({IMPORT_ERROR}); "
                             "apt-get install python3-pyroute2")
    s = GenericNetlinkSocket()
    try:
        s.bind(FAMILY, nbdmsg)
    except NetlinkError as e:
        s.close()
        if e.code == errno.ENOENT:
            raise NbdUnavailable("the kernel has no NBD client (no 'nbd' netlink family; "
                                 "modprobe nbd)") from None
        raise
    return s


def message(cmd: int, attrs: list) -> "nbdmsg":
    msg = nbdmsg()
    msg["cmd"], msg["version"], msg["attrs"] = cmd, VERSION, attrs
    return msg


def _call(cmd: int, attrs: list, what: str, ack: bool) -> list:
    """One request on a fresh socket, so no stray ACK lands in a shared
    queue.  CONNECT and STATUS answer with a message; DISCONNECT and
    RECONFIGURE only with an ACK, so they ask for one."""
    s = _open()
    try:
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        return list(s.nlm_request(message(cmd, attrs), msg_type=s.prid, msg_flags=flags))
    except NetlinkError as e:
        raise NbdError(f"{what}: {_reason(e)}", e.code) from None
    finally:
        s.close()


def _reason(e: "NetlinkError") -> str:
    """The kernel's extended ack text if it sent one, else the errno's."""
    text = e.args[1] if len(e.args) > 1 else None
    return str(text) if text else os.strerror(e.code)


def sockets_attr(socks: Sequence[socket.socket]) -> list:
    return [{"attrs": [("NBD_SOCK_FD", s.fileno())]} for s in socks]


def backend_of(index: int) -> str | None:
    """The device's backend identifier ('' if it has none), or None when
    it is not configured."""
    try:
        with open(f"/sys/block/nbd{index}/backend") as f:
            return f.read().rstrip("\n")
    except FileNotFoundError:
        return None


def connect(socks: Sequence[socket.socket], size: int, block_size: int, flags: int,
            timeout: int, dead_conn_timeout: int, backend: str,
            index: int | None = None) -> int:
    """Hand negotiated sockets to the kernel; returns the device index.
    ``index`` None: any free device (the kernel adds one if none is free)."""
    if len(socks) > 1 and not flags & FLAG_CAN_MULTI_CONN:
        raise NbdError("the server does not allow several connections", errno.EINVAL)
    if index is not None and any(connected for i, connected in status(index) if i == index):
        raise NbdError(f"/dev/nbd{index} is in use", errno.EBUSY)
    attrs = [("NBD_ATTR_SIZE_BYTES", size), ("NBD_ATTR_BLOCK_SIZE_BYTES", block_size),
             ("NBD_ATTR_SERVER_FLAGS", flags), ("NBD_ATTR_TIMEOUT", timeout),
             ("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout),
             ("NBD_ATTR_CLIENT_FLAGS", 0),      # an umount must not detach
             ("NBD_ATTR_BACKEND_IDENTIFIER", backend),
             ("NBD_ATTR_SOCKETS", sockets_attr(socks))]
    if index is not None:
        attrs.append(("NBD_ATTR_INDEX", index))
    replies = [m for m in _call(CMD_CONNECT, attrs, "NBD connect", ack=False)
               if m.get("cmd") == CMD_CONNECT and m.get_attr("NBD_ATTR_INDEX") is not None]
    if not replies:
        raise NbdError("NBD connect: the kernel sent no device index", errno.EPROTO)
    got = replies[0].get_attr("NBD_ATTR_INDEX")
    if backend_of(got) != backend:
        disconnect(got)
        raise NbdError(f"/dev/nbd{got}: the kernel did not keep the backend identifier "
                       "(Linux >= 5.14 needed for a safe reconnect)", errno.EOPNOTSUPP)
    return got


def reconfigure(index: int, socks: Sequence[socket.socket], backend: str) -> None:
    """Give /dev/nbdN new sockets in place of its dead ones."""
    current = backend_of(index)
    if current != backend:
        raise NbdError(f"/dev/nbd{index} serves {current!r}, not {backend!r}: "
                       "backend identifier mismatch", errno.EINVAL)
    _call(CMD_RECONFIGURE, [("NBD_ATTR_INDEX", index), ("NBD_ATTR_BACKEND_IDENTIFIER", backend),
                            ("NBD_ATTR_SOCKETS", sockets_attr(socks))],
          f"NBD reconfigure of /dev/nbd{index}", ack=True)


def disconnect(index: int) -> None:
    _call(CMD_DISCONNECT, [("NBD_ATTR_INDEX", index)], f"NBD disconnect of /dev/nbd{index}",
          ack=True)


def status(index: int | None = None) -> list[tuple[int, bool]]:
    """[(index, has a configuration)] of every device, or of ``index``."""
    attrs = [] if index is None else [("NBD_ATTR_INDEX", index)]
    return [(item.get_attr("NBD_DEVICE_INDEX"), bool(item.get_attr("NBD_DEVICE_CONNECTED")))
            for m in _call(CMD_STATUS, attrs, "NBD status", ack=False)
            for item in (m.get_attr("NBD_ATTR_DEVICE_LIST") or [])]


class LinkDeadEvents:
    """The indexes of devices whose socket died, as the kernel multicasts
    them; a socket of its own so events never mix with command replies."""

    def __init__(self) -> None:
        self.sock = _open()
        self.sock.add_membership(MCAST_GROUP)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> Iterator[int]:
        """The indexes in what is waiting (call when fileno() is readable)."""
        for m in self.sock.get():
            if m.get("cmd") == CMD_LINK_DEAD:
                yield m.get_attr("NBD_ATTR_INDEX")

    def close(self) -> None:
        self.sock.close()
