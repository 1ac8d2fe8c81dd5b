"""A clone kept on a real distributed store: an RBD image of a single-node
Ceph cluster (tests/ceph.py), served over NBD by qemu-nbd.

The model-based restore and the SIGKILL crash test of the local case, run
against that clone; then the qemu-nbd in front of the image is killed in
the middle of a restore and started again.
"""
import os
import random

import nbd

from ceph import CephCluster
from helpers import (SIZE, clone_state, fractured_then_damaged, read_bitmap, restore_status,
                     wait_clone_state, wait_for, wait_restore_done, whole)
from workloads import host_io_during_restore, run_crash_points


def serve_image(cluster: CephCluster, workdir: str, image: str):
    """A fresh RBD image behind qemu-nbd on a Unix socket: (proc, socket, uri)."""
    cluster.create_image(image, SIZE)
    sock = os.path.join(workdir, f"{image}.sock")
    proc = cluster.serve_nbd(image, sock)
    return proc, sock, f"nbd+unix:///?socket={sock}"


def rbd_content(uri: str) -> bytes:
    """The image's bytes, read through qemu-nbd by a client of our own."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return whole(h, SIZE)
    finally:
        del h


def test_restore_from_ceph_clone(daemon, workdir, ceph_cluster):
    rng = random.Random(90)
    proc, _, uri = serve_image(ceph_cluster, workdir, "model")
    try:
        clone_data, src = fractured_then_damaged(daemon, rng, remote=uri)
        assert rbd_content(uri) == clone_data  # the clone's bytes are in Ceph
        daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
        model, touched = host_io_during_restore(daemon, src, clone_data, 900, 80)
        assert rbd_content(uri) == clone_data, "the Ceph clone changed during the restore"
        assert read_bitmap(daemon.state_dir, "c1", "delta") == touched
        daemon.cli("clone", "sync", "c1")
        wait_clone_state(daemon, "src", "c1", "synchronized")
        assert rbd_content(uri) == bytes(model)
    finally:
        ceph_cluster.stop_server(proc)


def test_sigkill_during_restore_from_ceph_clone(daemon, workdir, ceph_cluster,
                                               long_mode):
    proc, _, uri = serve_image(ceph_cluster, workdir, "crash")
    try:
        points = 60 if long_mode else 8
        tried, mismatches = run_crash_points(daemon, points, seed=7, remote=uri)
        print(f"Ceph clone: crash points tried: {tried}, mismatches: {mismatches}")
        assert tried >= points and mismatches == 0
    finally:
        ceph_cluster.stop_server(proc)


def test_qemu_nbd_killed_mid_restore(daemon, workdir, ceph_cluster):
    """The NBD server in front of the image dies (SIGKILL) mid-restore and
    comes back: the restore pauses or rides it out, then finishes with the
    clone's data; the image is untouched."""
    rng = random.Random(91)
    proc, sock, uri = serve_image(ceph_cluster, workdir, "killed")
    clone_data, src = fractured_then_damaged(daemon, rng, remote=uri)
    daemon.cli("restore", "src", "--from", "c1", "--rate", "128K")
    ceph_cluster.kill_server(proc)
    wait_for(lambda: not clone_state(daemon, "src", "c1")["remote"]["connected"], 30,
             what="status shows qemu-nbd gone")
    proc = ceph_cluster.serve_nbd("killed", sock)
    try:
        wait_for(lambda: clone_state(daemon, "src", "c1")["remote"]["connected"], 60,
                 what="reconnected to the new qemu-nbd")
        if restore_status(daemon, "src")["state"] == "paused":
            daemon.cli("restore", "resume", "src")
        daemon.cli("restore", "rate", "src", "0")
        wait_restore_done(daemon, "src")
        assert whole(src, SIZE) == clone_data
        assert rbd_content(uri) == clone_data
    finally:
        del src
        ceph_cluster.stop_server(proc)
