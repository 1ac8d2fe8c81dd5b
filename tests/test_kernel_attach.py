"""The kernel attach path, as far as a host without the nbd module can run
it: the netlink messages as the kernel parses them (with the pyroute2 of
the venv and with Debian's, which the package uses), and the handshake that
leaves a real daemon's sockets in the transmission phase the kernel
expects (simple replies).  The kernel side runs in the VM suite
(tests/vm/guest/run: attach, restart)."""
import os
import re
import socket
import struct
import subprocess
import time

import nbd
import pytest

from helpers import MiB, ROOT
from lunclone import kernel_attach as ka
from lunclone import netlink_nbd as nl
from lunclone.attach import kernel_nbd_missing

NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH = 0, 1, 3


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each attribute in ``data`` (netlink TLVs)."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        out.append((kind, data[pos + 4:pos + length]))
        pos += (length + 3) & ~3
    return out


ENCODE = r"""
import struct, sys
sys.path.insert(0, sys.argv[1])
from lunclone import netlink_nbd as nl
m = nl.message(nl.CMD_CONNECT, [
    ("NBD_ATTR_SIZE_BYTES", 1 << 30), ("NBD_ATTR_BLOCK_SIZE_BYTES", 512),
    ("NBD_ATTR_SERVER_FLAGS", 0x12d), ("NBD_ATTR_DEAD_CONN_TIMEOUT", 300),
    ("NBD_ATTR_BACKEND_IDENTIFIER", "lunclone:/var/lib/lunclone:db"),
    ("NBD_ATTR_SOCKETS", nl.sockets_attr([open("/dev/null"), open("/dev/null")])),
    ("NBD_ATTR_INDEX", 3)])
m["header"]["type"] = 0x1d
m.encode()
sys.stdout.write(m.data.hex())
"""


@pytest.mark.parametrize("python", [os.path.join(ROOT, ".venv", "bin", "python"),
                                    "/usr/bin/python3"], ids=["venv", "debian"])
def test_connect_message_is_laid_out_as_the_kernel_reads_it(python):
    if not os.path.exists(python):
        pytest.skip(f"{python} does not exist (scripts/setup makes the venv)")
    probe = subprocess.run([python, "-c", "import pyroute2"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} has no pyroute2 (apt-get install python3-pyroute2)")
    hexdata = subprocess.run([python, "-c", ENCODE, os.path.join(ROOT, "daemon")],
                             capture_output=True, text=True, check=True).stdout
    data = bytes.fromhex(hexdata)
    cmd, version = data[16], data[17]
    assert (cmd, version) == (nl.CMD_CONNECT, 1)
    attrs = dict((kind & 0x3fff, payload) for kind, payload in _attrs(data[20:]))
    assert struct.unpack("=Q", attrs[2]) == (1 << 30,)
    assert struct.unpack("=I", attrs[1]) == (3,)
    assert attrs[10] == b"lunclone:/var/lib/lunclone:db\0"      # NLA_STRING, NUL-terminated
    items = _attrs(attrs[7])
    # The kernel refuses any element of NBD_ATTR_SOCKETS that is not type 1.
    assert [kind & 0x3fff for kind, _ in items] == [1, 1]
    fds = [struct.unpack("=I", dict(_attrs(p))[1])[0] for _, p in items]
    assert len(set(fds)) == 2 and all(fd > 2 for fd in fds)


def _request(sock, cmd: int, handle: int, offset: int, length: int, payload=b"") -> bytes:
    sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd, handle, offset, length)
                 + payload)
    reply = b""
    while len(reply) < 16:
        reply += sock.recv(16 - len(reply))
    magic, error, got = struct.unpack(">IIQ", reply)
    assert (magic, error, got) == (NBD_SIMPLE_REPLY_MAGIC, 0, handle)
    data = b""
    while cmd == NBD_CMD_READ and len(data) < length:
        data += sock.recv(length - len(data))
    return data


def test_handshake_leaves_sockets_the_kernel_can_use(daemon):
    """What the kernel does after CONNECT, done by hand on the sockets the
    handshake hands over: simple requests and replies, on each connection."""
    daemon.cli("create", "vol", "--size", "8M")
    socks, info = ka.open_connections(daemon.nbd_socket, "vol", 2)
    try:
        assert info.size == 8 * MiB and info.block_size == 512
        for bit in (nl.FLAG_HAS_FLAGS, nl.FLAG_SEND_FLUSH, nl.FLAG_SEND_FUA,
                    nl.FLAG_SEND_TRIM, nl.FLAG_CAN_MULTI_CONN):
            assert info.flags & bit, hex(info.flags)
        assert not info.flags & nl.FLAG_READ_ONLY
        one, two = os.urandom(4096), os.urandom(4096)
        _request(socks[0], NBD_CMD_WRITE, 1, 0, 4096, one)
        _request(socks[1], NBD_CMD_WRITE, 2, MiB, 4096, two)
        _request(socks[0], NBD_CMD_FLUSH, 3, 0, 0)
        assert _request(socks[1], NBD_CMD_READ, 4, 0, 4096) == one
    finally:
        for s in socks:
            s.close()
    h = daemon.connect("vol")
    assert h.pread(4096, MiB) == two
    del h


def test_handshake_of_a_missing_volume_is_one_line(daemon):
    with pytest.raises(Exception) as e:
        ka.open_connections(daemon.nbd_socket, "nope", 1)
    assert "handshake for 'nope' failed" in str(e.value) and "\n" not in str(e.value)


def test_backend_identifier_names_state_dir_and_volume(daemon):
    daemon.cli("create", "vol", "--size", "4M")
    assert ka.served_state_dir(daemon.run_dir) == os.path.abspath(daemon.state_dir)
    assert ka.backend_identifier(ka.served_state_dir(daemon.run_dir), "vol") == \
        f"lunclone:{os.path.abspath(daemon.state_dir)}:vol"


def test_block_size_is_one_the_kernel_takes():
    assert [ka._block_size(m) for m in (0, 1, 512, 513, 4096)] == [512, 512, 512, 1024, 4096]
    with pytest.raises(Exception, match="exceeds 4096"):
        ka._block_size(8192)


def test_attach_refusals_are_one_line(daemon):
    daemon.cli("create", "vol", "--size", "4M")
    p = daemon.cli("attach", "vol", "--connections", "0", check=False)
    assert p.returncode != 0 and "--connections" in p.stderr
    if kernel_nbd_missing():
        p = daemon.cli("attach", "vol", "/dev/nbd3", check=False)
        assert p.returncode != 0 and "omit DEVICE" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        assert not os.listdir(os.path.join(daemon.run_dir, "attach"))


def test_shutdown_hands_clients_back_without_an_error_reply(daemon):
    """nbdkit on SIGTERM waits for idle clients forever (the kernel's never
    leave).  ``lunclone shutdown`` ends each connection and the daemon
    exits; a request sent just before gets its reply or none (the kernel
    re-sends an unanswered one), never an error: the kernel would turn an
    error into an I/O error for the filesystem."""
    daemon.cli("create", "vol", "--size", "8M")
    socks, _ = ka.open_connections(daemon.nbd_socket, "vol", 2)
    h = daemon.connect("vol")
    h.pwrite(b"a" * 4096, 0)
    time.sleep(1.0)                    # every worker now blocks reading an idle socket
    payload = os.urandom(65536)
    socks[0].sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 7, MiB,
                                 len(payload)) + payload)
    p = daemon.cli("shutdown", "--timeout", "20")
    released = int(re.search(r"(\d+) client connection\(s\) handed back", p.stdout)[1])
    assert released >= 3, p.stdout
    assert daemon.proc.wait(10) == 0
    answered = b""
    while chunk := socks[0].recv(4096):
        answered += chunk
    assert answered in (b"", struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, 0, 7)), answered
    assert socks[1].recv(1) == b""
    for s in socks:
        s.close()
    del h
    daemon.start()
    h = daemon.connect("vol")
    if answered:
        assert h.pread(len(payload), MiB) == payload
    del h


def test_a_record_names_one_process_not_a_reused_pid():
    """detach signals the supervisor named in the record: a pid alone could
    name whatever process reuses it, so the start time comes with it."""
    from lunclone.attach import _alive, _proc_start
    me = os.getpid()
    assert _alive(me, _proc_start(me))
    assert not _alive(me, str(int(_proc_start(me)) + 1))
    assert not _alive(None) and _proc_start(2 ** 22 + 12345) is None
