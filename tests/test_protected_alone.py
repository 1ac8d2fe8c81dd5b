"""A protected bit stops a copy, so it waits for the full commit's
fdatasync of the copy it stops (review8) -- unless that copy is durable
already: the job wrote it back in its own thread (the host was busy), and
``finish_runs(durable=True)`` recorded no fdatasync to wait for.  Then a
host write into the extent has its protected bit committed alone (a
requests-only commit, or a full one with no volume to fdatasync, the
clear needing none either), which is what keeps host writes
during a restore from waiting for the disk (issue 15, item 3)."""
from __future__ import annotations

from helpers import read_bitmap
from live import EXT


def test_write_into_a_copy_written_back_commits_its_protected_bit_alone(live, monkeypatch):
    clone_data = live.pending_restore(paused=True)
    src_fd = live.family("src").source.fd
    synced = live.quiet_committer(monkeypatch)
    i = max(live.family("src").restore.pending.iter_set())
    live.job_copy(i, write_back=True)
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
    synced = live.quiet_committer(monkeypatch)
    i = max(live.family("src").restore.pending.iter_set())
    live.job_copy(i, write_back=False)
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
    synced = live.quiet_committer(monkeypatch)
    i = max(live.family("src").restore.pending.iter_set())
    live.job_copy(i, write_back=False)
    with fam.maps_lock:
        assert not fam.copy_durable(fam.restore, i)
    live.commit()
    with fam.maps_lock:
        assert fam.copy_durable(fam.restore, i)
    del synced[:]
    live.write("src", b"h" * 4096, i * EXT)
    assert src_fd not in synced
