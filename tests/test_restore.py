"""Instant protected restore against a real nbdkit, checked against a model.

Each test is named for the rule it shows; the rules are in docs/DESIGN.md
("A host request", "Restore"), which also maps them to the claims.
"""
import os
import random
import subprocess
import time

import nbd
import pytest

from helpers import (EXT, SIZE, MiB, clone_state, fractured_clone, fractured_then_damaged,
                     read_bitmap, restore_status, wait_clone_state, wait_restore_done, whole)
from workloads import host_io_during_restore



def test_restore_model_many_connections(daemon):
    """Reads and writes of every shape on several connections
    during a restore; every byte matches the model, the clone is untouched,
    and the clone's delta map ends as exactly the extents the host wrote."""
    rng = random.Random(11)
    clone_data, early = fractured_then_damaged(daemon, rng)
    # A slow restore keeps running while the host works.
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    # The connection opened before the restore sees the clone's data at once.
    for off in (0, 5 * MiB + 4096, SIZE - 4096):
        assert early.pread(4096, off) == clone_data[off:off + 4096]
    model, touched = host_io_during_restore(daemon, early, clone_data, 100, 120)
    assert restore_status(daemon, "src")["on_demand_extents"] > 0
    assert whole(daemon.connect("c1"), SIZE) == clone_data  # a protected restore keeps the clone
    c1 = clone_state(daemon, "src", "c1")
    assert c1["state"] == "fractured"
    assert read_bitmap(daemon.state_dir, "c1", "delta") == touched  # the clone's delta = what the host wrote
    assert restore_status(daemon, "src")["protected_extents"] == len(touched)  # host writes protect


def test_restore_copies_only_the_clones_delta_extents(daemon):
    """Only the extents in the clone's delta map are copied."""
    src = fractured_clone(daemon, 64 * MiB, 32 * MiB)
    for k in range(5):
        src.pwrite(os.urandom(4096), k * 5 * MiB)
    delta = clone_state(daemon, "src", "c1")["delta_extents"]
    assert delta == 5
    daemon.cli("restore", "src", "--from", "c1", "--wait")
    r = restore_status(daemon, "src")
    assert r["total_extents"] == 5 and r["copied_bytes"] == 5 * EXT
    assert whole(src, 64 * MiB) == whole(daemon.connect("c1"), 64 * MiB)


def test_restore_returns_before_copying_and_reads_see_clone(daemon):
    """The source shows the clone's data the moment restore returns."""
    rng = random.Random(5)
    clone_data, src = fractured_then_damaged(daemon, rng)
    daemon.cli("restore", "rate", "src", "1", check=False)  # no restore yet: refused
    t0 = time.monotonic()
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    took = time.monotonic() - t0
    daemon.cli("restore", "pause", "src")
    r = restore_status(daemon, "src")
    assert r["state"] == "paused" and r["pending_extents"] > 0
    # Paused: every read still returns the clone's data, read from the clone
    # where it is pending (a read copies nothing).
    assert whole(src, SIZE) == clone_data
    after = restore_status(daemon, "src")
    assert after["pending_extents"] == r["pending_extents"] and after["on_demand_extents"] == 0
    daemon.cli("restore", "resume", "src")
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    assert whole(src, SIZE) == clone_data
    assert took < 5


def test_unprotected_restore_mirrors_and_ends_synchronized(daemon):
    rng = random.Random(8)
    clone_data, src = fractured_then_damaged(daemon, rng)
    daemon.cli("restore", "src", "--from", "c1", "--unprotected", "--rate", "64K")
    daemon.cli("restore", "pause", "src")
    src.pwrite(b"N" * 4096, 3 * MiB + 100)
    daemon.cli("restore", "resume", "src")
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    wait_clone_state(daemon, "src", "c1", "synchronized")  # after a short resync
    assert whole(src, SIZE) == whole(daemon.connect("c1"), SIZE)
    assert src.pread(4096, 3 * MiB + 100) == b"N" * 4096


def test_restore_refusals_and_read_only_clone(daemon):
    rng = random.Random(9)
    clone_data, src = fractured_then_damaged(daemon, rng)
    daemon.cli("create", "other", "--size", "16M")
    daemon.cli("clone", "create", "other", "oc")
    wait_clone_state(daemon, "other", "oc", "synchronized")
    daemon.cli("clone", "fracture", "oc")
    c1 = daemon.connect("c1")
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    daemon.cli("restore", "pause", "src")
    for args, words in [
        (["restore", "src", "--from", "c1"], "already being restored"),
        (["restore", "src", "--from", "oc"], "not of src"),
        (["clone", "delete", "c1"], "running restore"),
        (["delete", "src", "--force"], "being restored"),
        (["clone", "sync", "c1"], "restoring"),
    ]:
        p = daemon.cli(*args, check=False)
        assert p.returncode != 0 and words in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1
    with pytest.raises(nbd.Error) as e:
        c1.pwrite(b"x" * 4096, 0)
    assert e.value.errno == "EPERM"  # NBD has no EROFS
    assert whole(c1, SIZE) == clone_data
    daemon.cli("restore", "resume", "src")
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")


def test_other_clones_get_restored_extents(daemon):
    rng = random.Random(4)
    clone_data, src = fractured_then_damaged(daemon, rng)
    daemon.cli("clone", "create", "src", "c2")
    wait_clone_state(daemon, "src", "c2", "synchronized")
    daemon.cli("clone", "fracture", "c2")
    pending = clone_state(daemon, "src", "c1")["delta_extents"]
    daemon.cli("restore", "src", "--from", "c1", "--wait")
    c2 = clone_state(daemon, "src", "c2")
    assert c2["delta_extents"] >= pending
    daemon.cli("clone", "sync", "c2")
    wait_clone_state(daemon, "src", "c2", "synchronized")
    assert whole(daemon.connect("c2"), SIZE) == clone_data


def test_fio_verify_during_restore(daemon):
    import shutil
    from fio import run_fio
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (run scripts/setup)")
    rng = random.Random(21)
    clone_data, src = fractured_then_damaged(daemon, rng)
    daemon.cli("restore", "src", "--from", "c1", "--rate", "512K")
    res = run_fio(daemon.uri("src"), rw="randwrite", bs="4k", size="8M", iodepth=16,
                  verify="crc32c", extra=["--offset=4M"])
    job = res["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] > 0
    assert restore_status(daemon, "src")["state"] == "running"
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    got = whole(src, SIZE)
    # Outside fio's range the clone's data is back.
    assert got[:4 * MiB] == clone_data[:4 * MiB] and got[12 * MiB:] == clone_data[12 * MiB:]


def test_backup_with_nbdcopy_during_a_restore_gets_the_clones_data(daemon, workdir):
    """Block status answers for what a read returns: nbdcopy (which skips
    what the server calls holes) copies the clone's data mid-restore, also
    where the source file has a hole and the clone has data."""
    rng = random.Random(11)
    clone_data, src = fractured_then_damaged(daemon, rng)
    src.trim(4 * MiB, 0)  # holes on the source, data on the clone: all pending
    clone_data = whole(daemon.connect("c1"), SIZE)
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    daemon.cli("restore", "pause", "src")
    out = os.path.join(workdir, "backup.img")
    subprocess.run(["nbdcopy", daemon.uri("src"), out], check=True, timeout=120)
    with open(out, "rb") as f:
        assert f.read() == clone_data
    daemon.cli("restore", "resume", "src")
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")


@pytest.mark.parametrize("undo", [False, True], ids=["restore", "undo"])
def test_a_finished_restore_says_the_same_after_a_restart(daemon, undo):
    """``status`` of a finished restore (or undo) is the same after a
    daemon restart: ``protected_extents`` counts what the host wrote
    during it, not the clone's delta map as it is now (writes made since
    the restore ended; for an undo, also the extents it brought back)."""
    _, src = fractured_then_damaged(daemon, random.Random(31))
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K",
               *(["--undo"] if undo else []))
    if undo:
        daemon.cli("restore", "undo", "src", "--rate", "64K")
    src.pwrite(b"p" * 4096, 2 * EXT)  # during it: protected
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    src.pwrite(b"a" * 4096, 9 * EXT)  # after it: the clone's delta map only
    before = daemon.json("status", "src")["restore"]
    assert before["protected_extents"] == 1
    del src
    daemon.stop()
    daemon.start()
    after = daemon.json("status", "src")["restore"]
    assert {k: after[k] for k in ("kind", "state", "protected_extents", "total_extents")} == \
        {k: before[k] for k in ("kind", "state", "protected_extents", "total_extents")}
