"""Restore throughput from a remote clone, beside nbdcopy of the same bytes.

    scripts/bench remote [--rounds N] [--size-mb M]

Network: two namespaces (tests/netns.py), the daemon on the client host,
the clone's file served with TLS-PSK from the storage host, at 0 and 2 ms
of added round trip.  Ceph: the clone on an RBD image behind qemu-nbd
(tests/ceph.py), when Ceph's packages are there.  In every case the
baseline is ``nbdcopy`` of the same export to a file on the client side
(the same extents: every extent differs), and the sides alternate.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import pretouch, wait_restore_done, wait_state
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
        finally:
            d.stop()
    shutil.rmtree(work, ignore_errors=True)


def bench_remote(args) -> None:
    size = args.size_mb << 20
    print(f"-- restore of {args.size_mb} MiB from a remote clone (every extent differs), "
          f"median of {args.rounds} alternated rounds")
    print(f"{'link':34}{'restore':>14}{'nbdcopy':>16}{'ratio':>9}", flush=True)
    bench_network(args, size)
    bench_ceph(args, size)


if __name__ == "__main__":
    sys.exit("run through scripts/bench remote")
