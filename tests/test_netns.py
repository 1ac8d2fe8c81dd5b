"""Smoke tests of tests/netns.py: two hosts made of network namespaces, NBD
over TLS-PSK between them, added latency, a link cut."""
import hashlib
import os
import subprocess
import time

import nbd
import pytest

from helpers import Daemon, MiB
from netns import NETNS_DIR, NetworkHosts, unavailable_reason

PORT = 10809
NBD_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}

# Runs in the client namespace: write, flush, reconnect, read back.
WRITE_READ = r"""
import hashlib, nbd, os, sys
uri, off = sys.argv[1], int(sys.argv[2])
data = os.urandom(1 << 20)
h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(uri)
assert h.get_tls_negotiated(), "TLS not negotiated"
h.pwrite(data, off); h.flush(); h.shutdown(); del h
h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(uri)
assert h.pread(len(data), off) == data, "read back differs"
print(hashlib.sha256(data).hexdigest())
"""

# Runs in the client namespace: median and mean of 200 sequential 512 B reads, in ms.
RTT = r"""
import nbd, statistics, sys, time
h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1])
for _ in range(20):
    h.pread(512, 0)
ts = []
t0 = time.perf_counter()
for _ in range(200):
    t = time.perf_counter(); h.pread(512, 0); ts.append(time.perf_counter() - t)
print(statistics.median(ts) * 1000, (time.perf_counter() - t0) / 200 * 1000)
"""

# Runs in the client namespace: MB/s of reading 32 MiB (the export twice over)
# with 16 x 1 MiB in flight.
THROUGHPUT = r"""
import nbd, sys, time
h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1])
size, chunk, depth = 32 << 20, 1 << 20, 16
off, pending, export = 0, {}, h.get_size()
t = time.perf_counter()
while off < size or pending:
    while off < size and len(pending) < depth:
        b = nbd.Buffer(chunk); pending[h.aio_pread(b, off % export)] = b; off += chunk
    h.poll(-1)
    for c in [c for c in pending if h.aio_command_completed(c)]:
        del pending[c]
print(size / (time.perf_counter() - t) / 1e6)
"""


@pytest.fixture
def net():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    hosts = NetworkHosts()
    try:
        yield hosts
    finally:
        hosts.close()
        for ns in (hosts.client_ns, hosts.storage_ns):
            assert not os.path.exists(os.path.join(NETNS_DIR, ns)), f"{ns} left behind"


@pytest.fixture
def export(net):
    """(image path, URI) of a 16 MiB file served with TLS-PSK from the storage host."""
    img = os.path.join(net.workdir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    uri = net.serve_file_tls(img, PORT, os.path.join(net.workdir, "keys.psk"))
    return img, uri


def file_digest(path: str, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def rtt_ms(net, uri) -> float:
    median, mean = map(float, net.python(net.client_ns, RTT, uri).stdout.split())
    return median


def test_tls_psk_export_reached_from_client_namespace(net, export):
    img, uri = export
    assert uri == (f"nbds://lunclone@{net.storage_addr}:{PORT}/"
                   f"?tls-psk-file={net.workdir}/keys.psk")
    digest = net.python(net.client_ns, WRITE_READ, uri, str(3 * MiB)).stdout.strip()
    assert file_digest(img, 3 * MiB, MiB) == digest
    # nbdinfo takes the same URI (it allows tls-psk-file itself).
    r = net.run(net.client_ns, ["nbdinfo", "--size", uri], env=NBD_ENV, check=True)
    assert int(r.stdout) == 16 * MiB
    # TLS is required: plain NBD is refused.
    plain = f"nbd://{net.storage_addr}:{PORT}/"
    r = net.run(net.client_ns, ["nbdinfo", "--size", plain], env=NBD_ENV, timeout=30)
    assert r.returncode != 0, r.stdout
    # The same export from this process, the socket made in the client namespace.
    h = net.nbd_connect(uri)
    assert h.get_tls_negotiated()
    with open(img, "rb") as f:
        f.seek(3 * MiB)
        assert h.pread(4096, 3 * MiB) == f.read(4096)
    del h


def test_latency_raises_round_trip(net, export):
    img, uri = export
    base = rtt_ms(net, uri)
    with net.latency(2) as lat:
        print(f"\nlatency method: {lat.how}" + (f" ({lat.detail})" if lat.detail else ""))
        delayed = rtt_ms(net, lat.uri)
        rise = delayed - base
        print(f"round trip of a 512 B read (median of 200): {base:.3f} ms without, "
              f"{delayed:.3f} ms with latency(2): +{rise:.3f} ms")
        assert 1.5 <= rise <= 4.0, (base, delayed)
        # Bytes go through unchanged.
        digest = net.python(net.client_ns, WRITE_READ, lat.uri, str(5 * MiB)).stdout.strip()
        assert file_digest(img, 5 * MiB, MiB) == digest
        # A delay line, not stop-and-wait: with 16 MiB in flight and 20 ms of
        # round trip, a relay that waited out the delay chunk by chunk (256 KiB)
        # would give at most 13 MB/s.  (TCP slow start at 20 ms keeps a delay
        # line well under the direct rate here: ~65 MB/s against ~190.)
        lat.set(20)
        longer = rtt_ms(net, lat.uri)
        mbs = float(net.python(net.client_ns, THROUGHPUT, lat.uri).stdout)
        print(f"after set(20): {longer:.3f} ms a read; 32 MiB read, 16 x 1 MiB in flight: "
              f"{mbs:.0f} MB/s")
        assert 19 <= longer - base <= 25, (base, longer)
        assert mbs > 30
    # Gone again.
    after = rtt_ms(net, uri)
    print(f"latency removed: {after:.3f} ms")
    assert after < base + 1.0


def test_cut_stalls_and_heal_restores(net, export):
    _, uri = export
    h = net.nbd_connect(uri)
    assert len(h.pread(4096, 0)) == 4096

    net.cut()
    print(f"\nlink states after cut: {net.link_state()}")
    assert net.reachable(PORT, timeout=1.0) is None        # no answer at all
    # A new connection from the client host cannot complete.
    t = time.monotonic()
    try:
        r = net.run(net.client_ns, ["nbdinfo", "--size", uri], env=NBD_ENV, timeout=3)
        assert r.returncode != 0, r.stdout
        outcome = f"failed: {r.stderr.strip()}"
    except subprocess.TimeoutExpired:
        outcome = "stalled (killed after 3 s)"
    print(f"new connection during the cut {outcome} after {time.monotonic() - t:.1f} s")
    # A request on the open connection stalls.
    buf = nbd.Buffer(4096)
    cookie = h.aio_pread(buf, 0)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        h.poll(100)
        assert not h.aio_command_completed(cookie), "request completed across a cut link"

    t = time.monotonic()
    net.heal()
    print(f"heal: link usable after {time.monotonic() - t:.2f} s")
    # The stalled request completes on TCP's next retransmission.
    deadline = t + 30
    while not h.aio_command_completed(cookie):
        assert time.monotonic() < deadline, "request still stalled 30 s after heal"
        h.poll(100)
    print(f"stalled request completed {time.monotonic() - t:.2f} s after heal began")
    del h
    # And a new connection works.
    r = net.run(net.client_ns, ["nbdinfo", "--size", uri], env=NBD_ENV, timeout=30, check=True)
    assert int(r.stdout) == 16 * MiB

    # Both ends down: the client loses its route and connecting fails at once.
    net.cut(both=True)
    s = net.socket(net.client_ns)
    s.settimeout(3)
    with pytest.raises(OSError):
        s.connect((net.storage_addr, PORT))
    s.close()
    net.heal()
    assert net.reachable(PORT) is True


def test_daemon_runs_in_client_namespace(net, workdir):
    d = Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run"),
               prefix=net.exec_prefix(net.client_ns)).start()
    try:
        ns_inode = os.stat(os.path.join(NETNS_DIR, net.client_ns)).st_ino
        assert os.stat(f"/proc/{d.proc.pid}/ns/net").st_ino == ns_inode
        # Its Unix sockets still serve the root namespace: they are paths.
        d.cli("create", "v", "--size", "4M")
        h = d.connect("v")
        assert h.get_size() == 4 * MiB
        del h
    finally:
        rc = d.stop()
    assert rc == 0, d.log()
