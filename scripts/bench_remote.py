"""Restore throughput from a remote clone, beside nbdcopy of the same bytes.

    scripts/bench remote [--rounds N] [--size-mb M] [--runtime S]

Network: two namespaces (tests/netns.py), the daemon on the client host,
the clone's file served with TLS-PSK from the storage host, at 0 and 2 ms
of added round trip.  Ceph: the clone on an RBD image behind qemu-nbd
(tests/ceph.py), when Ceph's packages are there.  In every case the
baseline is ``nbdcopy`` of the same export to a file on the client side
(the same extents: every extent differs), and the sides alternate.

On each link (+0 and +2 ms) and on Ceph, also host I/O on pending extents: with the
restore held at 1 MiB/s (nearly every extent pending, so each read goes to
the remote clone), fio 4k randread qd16 on the source beside the same fio
on the remote export itself; and the first read of one pending extent
after ``restore`` returns beside one plain read of the remote export.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

from bench import end_restore, pretouch, wait_restore_done, wait_state
from fio import iops, run_fio
from helpers import Daemon

NBD_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def damage_all(d: Daemon, size: int, extent: int) -> None:
    """One write in every extent of the source: the restore copies them all."""
    h = d.connect("v")
    stamp = os.urandom(512)
    for off in range(0, size, extent):
        h.pwrite(stamp, off)
    h.flush()
    del h


def timed_restore(d: Daemon, size: int, extent: int) -> float:
    from lunclone.client import Client
    damage_all(d, size, extent)
    pretouch(size + (256 << 20))
    t0 = time.monotonic()
    with Client(d.run_dir) as c:
        c.call("restore", source="v", clone_name="c")
    wait_restore_done(d, "v")
    return time.monotonic() - t0


def timed_nbdcopy(prefix: list[str], uri: str, dst: str, size: int) -> float:
    """nbdcopy export -> local file, then fdatasync: what the restore does."""
    if os.path.exists(dst):
        os.unlink(dst)
    pretouch(size + (256 << 20))
    t0 = time.monotonic()
    subprocess.run([*prefix, "nbdcopy", uri, dst], check=True, env=NBD_ENV)
    fd = os.open(dst, os.O_RDWR)
    os.fdatasync(fd)
    os.close(fd)
    took = time.monotonic() - t0
    os.unlink(dst)
    return took


def compare(label: str, d: Daemon, uri: str, prefix: list[str], work: str, size: int,
            rounds: int) -> None:
    extent = d.json("status", "v")["extent_size"]
    ours, base = [], []
    for r in range(rounds):
        for side in (("restore", "nbdcopy") if r % 2 == 0 else ("nbdcopy", "restore")):
            if side == "restore":
                ours.append(timed_restore(d, size, extent))
            else:
                base.append(timed_nbdcopy(prefix, uri, os.path.join(work, "nbdcopy.img"), size))
    m = statistics.median
    mb = size / 1e6
    print(f"{label:34}{mb / m(ours):>9.0f} MB/s{mb / m(base):>11.0f} MB/s"
          f"{m([b / a for a, b in zip(ours, base)]):>9.3f}", flush=True)


def make_clone(d: Daemon, uri: str, size: int) -> None:
    d.cli("create", "v", "--size", str(size))
    h = d.connect("v")
    chunk = os.urandom(1 << 20)
    for off in range(0, size, 1 << 20):
        h.pwrite(chunk[:-16] + os.urandom(16), off)
    h.flush()
    del h
    d.cli("clone", "create", "v", "c", "--remote", uri)
    wait_state(d, "v", "c", "synchronized")
    d.cli("clone", "fracture", "c")


PENDING_READ = dict(rw="randread", bs="4k", iodepth=16)


def start_pending(d: Daemon, size: int, extent: int) -> None:
    """Every extent differs, then a restore at 1 MiB/s: nearly all stay pending."""
    damage_all(d, size, extent)
    d.cli("restore", "v", "--from", "c", "--rate", "1M")


def pending_fio(label: str, d: Daemon, plain_uri: str, size: int, args) -> None:
    """fio on the source with its extents pending, beside fio on
    ``plain_uri`` (the remote export over the same link); alternated."""
    extent = d.json("status", "v")["extent_size"]
    pend, plain = [], []
    for r in range(args.rounds):
        for side in (("pending", "plain") if r % 2 == 0 else ("plain", "pending")):
            if side == "pending":
                start_pending(d, size, extent)
            pretouch(size + (256 << 20))
            uri = d.uri("v") if side == "pending" else plain_uri
            figure = iops(run_fio(uri, size=str(size), runtime=args.runtime, **PENDING_READ))
            (pend if side == "pending" else plain).append(figure)
            if side == "pending":
                end_restore(d, "v")
    rounds = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(pend, plain))
    ratio = statistics.median(a / b for a, b in zip(pend, plain))
    print(f"   {label}: fio 4k randread qd16, {args.runtime:g}s, pending/remote export "
          f"IOPS: {rounds}; median ratio {ratio:.3f}", flush=True)


def first_read(label: str, d: Daemon, remote, size: int, rounds: int) -> None:
    """ms from ``restore`` returning to the end of one 4k read of a pending
    extent, beside one 4k read on ``remote`` (a handle on the remote export)."""
    from lunclone.client import Client
    extent = d.json("status", "v")["extent_size"]
    h = d.connect("v")
    remote.pread(4096, 0)  # a warm handle, as the daemon's connections are
    firsts, plains = [], []
    for r in range(rounds):
        off = (size // 2 + r * 5 * extent) % size  # far from where the job starts
        damage_all(d, size, extent)
        t0 = time.perf_counter()
        expect = remote.pread(4096, off)
        plains.append(time.perf_counter() - t0)
        with Client(d.run_dir) as c:
            c.call("restore", source="v", clone_name="c", rate_limit=1 << 20)
        t1 = time.perf_counter()
        got = h.pread(4096, off)
        firsts.append(time.perf_counter() - t1)
        assert got == expect, "first read after restore is not the clone's data"
        end_restore(d, "v")
    del h
    m = statistics.median
    print(f"   {label}: first read of a pending extent after restore returns "
          f"{m(firsts) * 1e3:.2f} ms; one read of the remote export {m(plains) * 1e3:.2f} ms",
          flush=True)


def tls_proxy(net, link_uri: str, sock: str):
    """fio's nbd engine cannot open a URI with ``tls-psk-file`` (libnbd wants
    nbd_set_uri_allow_local_file): nbdkit's C nbd plugin in the client
    namespace forwards ``sock`` to the export, TLS and all, over the link."""
    u = urllib.parse.urlsplit(link_uri)
    psk = urllib.parse.parse_qs(u.query)["tls-psk-file"][0]
    p = net.popen(net.client_ns, [
        "nbdkit", "--foreground", "--exit-with-parent", "-U", sock, "nbd",
        f"hostname={u.hostname}", f"port={u.port or 10809}", "tls=require",
        f"tls-psk={psk}", f"tls-username={urllib.parse.unquote(u.username)}",
        f"export={urllib.parse.unquote(u.path.lstrip('/'))}"])
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("nbdkit nbd proxy did not start")
        time.sleep(0.05)
    return p


def network_pending(label: str, d: Daemon, net, link_uri: str, work: str, size: int,
                    args) -> None:
    """The pending rows of a TLS link.  Both fio runs open a Unix socket (the
    daemon's, the proxy's), so fio itself needs no namespace."""
    sock = os.path.join(work, "proxy.sock")
    proxy = tls_proxy(net, link_uri, sock)
    try:
        pending_fio(label, d, f"nbd+unix:///?socket={sock}", size, args)
        remote = net.nbd_connect(link_uri)  # made in the client namespace
        first_read(label, d, remote, size, args.rounds)
        del remote
    finally:
        net.kill(proxy)
        if os.path.exists(sock):  # a killed nbdkit leaves its socket behind
            os.unlink(sock)


def bench_network(args, size: int) -> None:
    from netns import NetworkHosts, unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"-- network: skipped: {reason}")
        return
    with NetworkHosts() as net:
        work = tempfile.mkdtemp(prefix="lcbr", dir="/tmp")
        path = os.path.join(work, "remote.img")
        with open(path, "wb") as f:
            f.truncate(size)
        uri = net.serve_file_tls(path, 10809, os.path.join(work, "keys.psk"))
        prefix = net.exec_prefix(net.client_ns)
        for rtt in (0, 2):
            lat = net.latency(rtt) if rtt else None
            link_uri = lat.uri if lat else uri
            d = Daemon(os.path.join(work, f"state{rtt}"), os.path.join(work, f"run{rtt}"),
                       prefix=prefix).start()
            try:
                make_clone(d, link_uri, size)
                if lat:
                    print(f"   ({rtt} ms added by {lat.how})")
                compare(f"TLS over veth, +{rtt} ms RTT", d, link_uri, prefix, work,
                        size, args.rounds)
                network_pending(f"+{rtt} ms", d, net, link_uri, work, size, args)
            finally:
                d.stop()
                if lat:
                    lat.stop()
        shutil.rmtree(work, ignore_errors=True)


def bench_ceph(args, size: int) -> None:
    from ceph import CephCluster, ceph_available
    reason = ceph_available()
    if reason:
        print(f"-- ceph: skipped: {reason}")
        return
    work = tempfile.mkdtemp(prefix="lcbc", dir="/tmp")
    with CephCluster(os.path.join(work, "ceph")) as cluster:
        cluster.create_image("clone", size)
        sock = os.path.join(work, "rbd.sock")
        cluster.serve_nbd("clone", sock)
        uri = f"nbd+unix:///?socket={sock}"
        d = Daemon(os.path.join(work, "state"), os.path.join(work, "run")).start()
        try:
            make_clone(d, uri, size)
            compare("Ceph RBD via qemu-nbd (Unix)", d, uri, [], work, size, args.rounds)
            ceph_pending(d, uri, size, args)
        finally:
            d.stop()
    shutil.rmtree(work, ignore_errors=True)


def ceph_pending(d: Daemon, uri: str, size: int, args) -> None:
    """The pending rows of Ceph: fio and the plain read open ``uri`` itself."""
    import nbd
    remote = nbd.NBD()
    remote.connect_uri(uri)
    pending_fio("Ceph", d, uri, size, args)
    first_read("Ceph", d, remote, size, args.rounds)
    del remote


def bench_remote(args) -> None:
    size = args.size_mb << 20
    print(f"-- restore of {args.size_mb} MiB from a remote clone (every extent differs), "
          f"median of {args.rounds} alternated rounds")
    print(f"{'link':34}{'restore':>14}{'nbdcopy':>16}{'ratio':>9}", flush=True)
    bench_network(args, size)
    bench_ceph(args, size)


if __name__ == "__main__":
    sys.exit("run through scripts/bench remote")
