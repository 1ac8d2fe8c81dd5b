"""A protected bit stops a copy, so it waits for the full commit's
fdatasync of the copy it stops (review8) -- unless that copy is durable
already: the job wrote it back in its own thread (the host was busy), and
``finish_runs(durable=True)`` recorded no fdatasync to wait for.  Then a
host write into the extent has its protected bit committed alone (a
requests-only commit, or a full one with no volume to fdatasync, the
clear needing none either), which is what keeps host writes
during a restore from waiting for the disk (issue 15, item 3)."""
from __future__ import annotations

import os
import time

from lunclone import commit
from helpers import read_bitmap
from live import EXT


def quiet_committer(live, monkeypatch) -> list[int]:
    """No periodic full commit for a minute; returns the fdatasync log."""
    monkeypatch.setattr(commit, "LAZY_INTERVAL", 60.0)
    live.engine.committer._wake.set()
    time.sleep(0.3)
    live.commit()
    synced: list[int] = []
    real = os.fdatasync

    def recording(fd):
        synced.append(fd)
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", recording)
    return synced


def job_copy(live, write_back: bool) -> int:
    """The job's steps on the last pending extent: take, copy, finish."""
    fam = live.family("src")
    r = fam.restore
    i = max(r.pending.iter_set())
    with fam.maps_lock:
        runs = fam.take_runs(r.pending, i, 1)
    assert runs == [(i, 1)]
    fam.copy_runs(r.data_source, fam.source.store, runs, write_back=write_back)
    with fam.maps_lock:
        fam.finish_runs(r.pending, runs, fam.source.store, copied=True, src=r.data_source,
                        durable=write_back)
    return i


def test_write_into_a_copy_written_back_commits_its_protected_bit_alone(live, monkeypatch):
    clone_data = live.pending_restore(paused=True)
    src_fd = live.family("src").source.fd
    synced = quiet_committer(live, monkeypatch)
    i = job_copy(live, write_back=True)
    assert src_fd in synced  # by the copy's own thread
    del synced[:]
    live.write("src", b"h" * 4096, i * EXT)  # returns once its protected bit is durable
    assert i in read_bitmap(live.state_dir, "src", "protected")
    assert src_fd not in synced, "the protected bit waited for an fdatasync of the source"
    data = live.read("src", i * EXT, EXT)
    assert data == b"h" * 4096 + clone_data[i * EXT + 4096:(i + 1) * EXT]


def test_write_into_a_copy_not_written_back_waits_for_its_fdatasync(live, monkeypatch):
    live.pending_restore(paused=True)
    src_fd = live.family("src").source.fd
    synced = quiet_committer(live, monkeypatch)
    i = job_copy(live, write_back=False)
    assert src_fd not in synced
    live.write("src", b"h" * 4096, i * EXT)
    assert i in read_bitmap(live.state_dir, "src", "protected")
    assert src_fd in synced, "a protected bit went out before the copy it stops was durable"


def test_a_full_commit_makes_earlier_copies_durable(live, monkeypatch):
    """Once a full commit has fdatasync'ed the source, a copy made before it
    no longer holds a protected bit back (and its note is pruned)."""
    live.pending_restore(paused=True)
    fam = live.family("src")
    src_fd = fam.source.fd
    synced = quiet_committer(live, monkeypatch)
    i = job_copy(live, write_back=False)
    with fam.maps_lock:
        assert not fam.copy_durable(fam.restore, i)
    live.commit()
    with fam.maps_lock:
        assert fam.copy_durable(fam.restore, i)
    del synced[:]
    live.write("src", b"h" * 4096, i * EXT)
    assert src_fd not in synced
