"""Instant protected restore against a real nbdkit, checked against a model.

Each test names the numbered claims of the method it shows; the rules they
rest on are in docs/DESIGN.md ("A host request", "Restore").
"""
import os
import random
import subprocess
import threading
import time

import nbd
import pytest

from helpers import clone_state, fractured_clone, read_bitmap, wait_clone_state, wait_for
from test_clones import whole

MiB = 1 << 20
EXT = 64 * 1024
SIZE = 16 * MiB


def restore_status(daemon, source):
    return daemon.json("status", source)["restore"]


def wait_restore_done(daemon, source, timeout=120):
    return wait_for(lambda: (restore_status(daemon, source) or {}).get("state") == "done",
                    timeout, what=f"restore of {source} done")


def prepare(daemon, rng, size=SIZE, remote=None):
    """src with data, clone c1 fractured, then src changed: returns
    (clone content = what the restore must bring back, src handle).
    With ``remote`` (an NBD URI) the clone lives behind that export."""
    daemon.cli("create", "src", "--size", str(size))
    src = daemon.connect("src")
    for off in range(0, size, MiB):
        if rng.random() < 0.8:
            src.pwrite(rng.randbytes(MiB), off)
    daemon.cli("clone", "create", "src", "c1", *(["--remote", remote] if remote else []))
    wait_clone_state(daemon, "src", "c1", "synchronized")
    daemon.cli("clone", "fracture", "c1")
    for _ in range(60):  # damage: differences to restore
        off = rng.randrange(0, size - 3 * EXT) & ~4095
        if rng.random() < 0.7:
            src.pwrite(rng.randbytes(rng.choice([4096, EXT, 3 * EXT])), off)
        else:
            src.trim(EXT, off & ~(EXT - 1))
    clone_data = whole(daemon.connect("c1"), size)
    assert whole(src, size) != clone_data
    return clone_data, src


class Worker(threading.Thread):
    """One libnbd connection doing random I/O in its own stripes of the volume,
    checking every read against the model as it goes."""

    def __init__(self, h, model, lock, stripes, seed, ops, extent=EXT):
        super().__init__()
        self.h, self.model, self.lock, self.stripes = h, model, lock, stripes
        self.rng = random.Random(seed)
        self.ops = ops
        self.extent = extent
        self.touched: set[int] = set()
        self.error: BaseException | None = None

    def run(self):
        try:
            for _ in range(self.ops):
                self.one()
        except BaseException as e:
            self.error = e

    def one(self):
        rng, h, model = self.rng, self.h, self.model
        s0, s1 = rng.choice(self.stripes)
        kind = rng.choice(["partial", "whole", "multi", "trim", "zero", "read", "read"])
        if kind == "partial":
            off, ln = s0 + rng.randrange(0, s1 - s0 - 4096) & ~511, rng.choice([512, 4096, 10_000])
        elif kind == "whole":
            off, ln = s0 + rng.randrange(0, (s1 - s0) // self.extent) * self.extent, self.extent
        elif kind == "multi":
            off = s0 + rng.randrange(0, (s1 - s0) // 2) & ~511
            ln = rng.randrange(self.extent, 3 * self.extent) & ~511
        else:
            off = s0 + rng.randrange(0, s1 - s0 - self.extent) & ~511
            ln = rng.choice([4096, self.extent, 2 * self.extent + 512])
        ln = min(ln, s1 - off)
        if kind == "read":
            got = h.pread(ln, off)
            assert got == bytes(model[off:off + ln]), f"read at {off}+{ln} differs from the model"
            return
        if kind in ("trim", "zero"):
            (h.trim if kind == "trim" else h.zero)(ln, off)
            data = bytes(ln)
        else:
            data = rng.randbytes(ln)
            h.pwrite(data, off)
        model[off:off + ln] = data
        self.touched.update(range(off // self.extent, (off + ln - 1) // self.extent + 1))


def stripes_for(n_workers, size, stripe=MiB):
    out = [[] for _ in range(n_workers)]
    for k, off in enumerate(range(0, size, stripe)):
        out[k % n_workers].append((off, off + stripe))
    return out


def host_io_during_restore(daemon, first, clone_data: bytes, seed: int, ops: int):
    """Four connections (``first`` and three more) do random I/O of every
    shape, checked against a model, while a slow restore of ``src`` runs;
    then the restore goes on to the end and every byte of ``src`` is
    compared with the model.  Returns (model, extents the host wrote)."""
    model = bytearray(clone_data)
    conns = [first] + [daemon.connect("src") for _ in range(3)]
    workers = [Worker(h, model, None, st, seed + k, ops)
               for k, (h, st) in enumerate(zip(conns, stripes_for(4, SIZE)))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for w in workers:
        if w.error:
            raise w.error
    assert restore_status(daemon, "src")["state"] == "running", \
        "the restore ended before the host writes did"
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    assert whole(daemon.connect("src"), SIZE) == bytes(model)
    return model, set().union(*(w.touched for w in workers))


def test_restore_model_many_connections(daemon):
    """Claims 1-9, 12: reads and writes of every shape on several connections
    during a restore; every byte matches the model, the clone is untouched,
    and the clone's delta map ends as exactly the extents the host wrote."""
    rng = random.Random(11)
    clone_data, early = prepare(daemon, rng)
    # A slow restore keeps running while the host works.
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    # The connection opened before the restore sees the clone's data at once.
    for off in (0, 5 * MiB + 4096, SIZE - 4096):
        assert early.pread(4096, off) == clone_data[off:off + 4096]
    model, touched = host_io_during_restore(daemon, early, clone_data, 100, 120)
    assert restore_status(daemon, "src")["on_demand_extents"] > 0
    assert whole(daemon.connect("c1"), SIZE) == clone_data  # claim 2
    c1 = clone_state(daemon, "src", "c1")
    assert c1["state"] == "fractured"
    assert read_bitmap(daemon.state_dir, "c1", "delta") == touched  # claim 12
    assert restore_status(daemon, "src")["protected_extents"] == len(touched)  # claim 5


def test_claim_10_11_only_delta_extents_copied(daemon):
    """Claims 10, 11, 14, 17: only the extents in the clone delta map are copied."""
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
    """Claim 1: the source shows the clone's data the moment restore returns."""
    rng = random.Random(5)
    clone_data, src = prepare(daemon, rng)
    daemon.cli("restore", "rate", "src", "1", check=False)  # no restore yet: refused
    t0 = time.monotonic()
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    took = time.monotonic() - t0
    daemon.cli("restore", "pause", "src")
    r = restore_status(daemon, "src")
    assert r["state"] == "paused" and r["pending_extents"] > 0
    # Paused: every read still returns the clone's data, by copy on demand.
    assert whole(src, SIZE) == clone_data
    assert restore_status(daemon, "src")["on_demand_extents"] > 0
    daemon.cli("restore", "resume", "src")
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    assert whole(src, SIZE) == clone_data
    assert took < 5


def test_unprotected_restore_mirrors_and_ends_synchronized(daemon):
    rng = random.Random(8)
    clone_data, src = prepare(daemon, rng)
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
    clone_data, src = prepare(daemon, rng)
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
    clone_data, src = prepare(daemon, rng)
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
    clone_data, src = prepare(daemon, rng)
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
    clone_data, src = prepare(daemon, rng)
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
