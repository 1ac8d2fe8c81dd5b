"""The restore rules on real files and a real SQLite database, driven from
threads like nbdkit's workers, to show what cannot be seen from a client:
a request on an extent whose copy is in flight waits in memory (claims 1,
3, 4) and the job never copies over an extent the host is writing (claims
7, 9)."""
import threading
import time

import pytest

from lunclone import volume as vf
from lunclone.bitmap import Bitmap
from lunclone.commit import Committer
from lunclone.iopath import Volume
from lunclone.store import FileStore
from lunclone.metadata import Metadata
from lunclone.policy import FRACTURED, RESTORING, Clone, Family, Restore

EXT = 64 * 1024
SIZE = 16 * EXT


@pytest.fixture
def family(tmp_path):
    md = Metadata(str(tmp_path))
    lock = threading.RLock()
    committer = Committer(md, lock)
    committer.start()
    paths = {}
    for name, fill in (("src", b"S"), ("cl", b"C")):
        paths[name] = str(tmp_path / f"{name}.img")
        vf.create_sparse(paths[name], SIZE)
        with open(paths[name], "r+b") as f:
            f.write(fill * SIZE)
    src = Volume("src", FileStore(paths["src"]), SIZE, EXT)
    cl = Volume("cl", FileStore(paths["cl"]), SIZE, EXT)
    fam = Family(src, committer, lock)
    delta = Bitmap(16, key=("cl", "delta"))
    delta.set_all()
    clone = Clone("cl", cl, FRACTURED, delta)
    fam.clones["cl"] = clone
    r = Restore(clone, True, delta.copy(("src", "pending")), Bitmap(16, key=("src", "protected")), 16)
    for bm in (delta, r.pending, r.protected):
        committer.register(bm)
    clone.state = RESTORING
    r.ready.set()
    fam.restore = r
    src.set_policy(fam)
    yield fam
    committer.stop()
    src.close()
    cl.close()
    md.close()


def in_thread(fn, *args):
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_claim_1_3_request_on_inflight_extent_waits(family):
    with family.maps_lock:
        assert family.take_run(family.restore.pending, 2, 1) == (2, 1)  # extent 2 in flight
    buf = bytearray(4096)
    t, box = in_thread(family.source.pread, buf, 2 * EXT + 100)
    time.sleep(0.2)
    assert t.is_alive(), "the read did not wait for the in-flight copy"
    vf.copy_range(family.restore.clone.volume.fd, family.source.fd, 2 * EXT, EXT)
    with family.maps_lock:
        family.finish_run(family.restore.pending, 2, 1, family.source.store, copied=True)
    t.join(5)
    assert not t.is_alive() and bytes(buf) == b"C" * 4096


def test_claim_7_9_job_skips_extent_being_written(family):
    with family.maps_lock:
        family.guard.writers[5] = 1  # a host write decided and in progress
        run = family.take_run(family.restore.pending, 5, 4)
    assert run == (6, 4)  # extent 5 is skipped while it is written


def test_claim_5_partial_write_copies_then_protects(family):
    family.source.pwrite(b"w" * 100, 3 * EXT + 10, False)
    r = family.restore
    assert r.protected.test(3) and not r.pending.test(3) and r.on_demand == 1
    got = bytearray(EXT)
    family.source.pread(got, 3 * EXT)
    assert got[:10] == b"C" * 10 and got[10:110] == b"w" * 100 and got[110:] == b"C" * (EXT - 110)
    # Whole-extent write: no copy needed.
    family.source.pwrite(b"W" * EXT, 7 * EXT, False)
    assert r.protected.test(7) and r.on_demand == 1
    with open(family.restore.clone.volume.path, "rb") as f:
        assert f.read() == b"C" * SIZE  # claim 2: the clone is untouched
