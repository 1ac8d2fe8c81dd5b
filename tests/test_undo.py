"""The undo image (issue 17, item 1): a restore keeps the source's
pre-restore data of every extent it overwrites, captured before the
overwrite, so that the volume as it was just before the restore is exactly
the undo image where captured and the clone everywhere else.

Checked against the real daemon, every byte: after host I/O of every shape
on several connections during the restore; after SIGKILLs at random points
of the capture (the crash rule: an extent of the original pending set is
captured with its old data in the undo image, or still holds its old data
in the source)."""
import json
import os
import random
import time

import pytest

from helpers import (EXT, SIZE, fractured_then_damaged, read_bitmap, restore_status,
                     synchronize_and_fracture, wait_restore_done, whole)
from test_contract import SCHEMA_PATH, check
from workloads import host_io, host_io_during_restore


def undo_path(daemon, source="src"):
    return os.path.join(daemon.state_dir, "undo", f"{source}.img")


def read_extent(path: str, i: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(i * EXT)
        return f.read(EXT)


def before_restore(daemon, rng):
    """The scenario: returns (the source's data just before the restore,
    the clone's data, the original pending set, a handle on src)."""
    clone_data, src = fractured_then_damaged(daemon, rng)
    before = whole(src, SIZE)
    pending = read_bitmap(daemon.state_dir, "c1", "delta")
    assert pending
    return before, clone_data, pending, src


def rebuilt_pre_restore(daemon, clone_data: bytes, captured: set[int]) -> bytes:
    """The undo image where captured, the clone everywhere else."""
    out = bytearray(clone_data)
    for i in captured:
        out[i * EXT:(i + 1) * EXT] = read_extent(undo_path(daemon), i)
    return bytes(out)


def test_restore_keeps_the_pre_restore_image(daemon):
    """Host I/O of every shape on four connections during a slow restore
    (copies on demand, whole-extent writes, the job): when it is done,
    every extent of the original pending set is captured, and the undo
    image plus the clone give back the pre-restore source byte for byte;
    the clone is untouched; status shows the undo image."""
    rng = random.Random(17)
    before, clone_data, pending, src = before_restore(daemon, rng)
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--rate", "64K")
    u = daemon.json("status", "src")["undo"]
    assert u["from"] == "c1" and u["state"] == "capturing"
    host_io_during_restore(daemon, src, clone_data, 100, 120)
    assert restore_status(daemon, "src")["on_demand_extents"] > 0
    captured = read_bitmap(daemon.state_dir, "src", "captured")
    assert captured == pending
    assert rebuilt_pre_restore(daemon, clone_data, captured) == before
    assert whole(daemon.connect("c1"), SIZE) == clone_data
    u = daemon.json("status", "src")["undo"]
    assert u == {"from": "c1", "captured_extents": len(pending),
                 "bytes": len(pending) * EXT, "state": "kept"}
    assert "undo image of the restore from c1: kept" in daemon.cli("status", "src").stdout


def test_no_undo_keeps_nothing(daemon):
    """The default (until 'restore undo' exists): no undo image."""
    rng = random.Random(3)
    before, clone_data, pending, src = before_restore(daemon, rng)
    daemon.cli("restore", "src", "--from", "c1", "--wait")
    assert daemon.json("status", "src")["undo"] is None
    assert not os.path.exists(undo_path(daemon))
    assert read_bitmap(daemon.state_dir, "src", "captured") == set()


def test_a_new_restore_drops_the_old_undo_image(daemon):
    rng = random.Random(4)
    before, clone_data, pending, src = before_restore(daemon, rng)
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--wait")
    assert read_bitmap(daemon.state_dir, "src", "captured") == pending
    src.pwrite(os.urandom(EXT), 0)
    daemon.cli("restore", "src", "--from", "c1", "--force", "--wait")
    assert daemon.json("status", "src")["undo"] is None
    assert read_bitmap(daemon.state_dir, "src", "captured") == set()
    assert not os.path.exists(undo_path(daemon))


def test_a_host_write_captures_its_block_along(daemon):
    """A host write into one pending extent captures the other pending
    extents of its ``CAPTURE_BLOCK`` too (one fdatasync and one commit for
    all: host I/O spread over the volume pays a capture per block), each
    with its pre-restore data; while the admin holds the restore paused,
    only what the write overwrites."""
    from lunclone.policy import CAPTURE_BLOCK
    rng = random.Random(21)
    before, clone_data, pending, src = before_restore(daemon, rng)
    nexts = SIZE // EXT
    # far from where the job (64 KiB/s) starts
    running_block = set(range(nexts - CAPTURE_BLOCK, nexts))
    paused_block = set(range(nexts - 2 * CAPTURE_BLOCK, nexts - CAPTURE_BLOCK))
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--rate", "64K")
    written = max(pending & running_block)
    src.pwrite(b"w" * 4096, written * EXT + 512)
    captured = read_bitmap(daemon.state_dir, "src", "captured")
    assert pending & running_block <= captured
    daemon.cli("restore", "pause", "src")
    written = max(pending & paused_block)
    src.pwrite(b"w" * 4096, written * EXT + 512)
    captured = read_bitmap(daemon.state_dir, "src", "captured")
    assert captured & paused_block == {written}
    for i in captured:
        assert read_extent(undo_path(daemon), i) == before[i * EXT:(i + 1) * EXT], i
    daemon.cli("restore", "resume", "src")
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    assert read_bitmap(daemon.state_dir, "src", "captured") == pending
    assert rebuilt_pre_restore(daemon, clone_data, pending) == before


def check_crash_rule(daemon, before: bytes, pending: set[int]) -> int:
    """After a SIGKILL, on the files: each extent of the original pending
    set is captured (its old data in the undo image) or holds its old data
    in the source.  Returns how many were captured."""
    captured = read_bitmap(daemon.state_dir, "src", "captured")
    assert captured <= pending
    source = daemon.volume_path("src")
    for i in pending:
        old = before[i * EXT:(i + 1) * EXT]
        if i in captured:
            assert read_extent(undo_path(daemon), i) == old, f"extent {i}: undo data wrong"
        else:
            assert read_extent(source, i) == old, \
                f"extent {i}: overwritten in the source before it was captured"
    return len(captured)


def test_sigkill_during_capture_keeps_the_rule(daemon, long_mode):
    """SIGKILL at random moments of a rate-limited restore with a writer
    doing a few partial and whole-extent writes between kills (most
    extents are left to the job, so kills fall in all of its captures);
    before each restart the crash rule is checked on the files; at the end
    the pre-restore image is rebuilt byte for byte.  (12 kills; with
    --long 100 or more, at a quarter of the rate so that the restore lasts.)"""
    rng = random.Random(23)
    before, clone_data, pending, src = before_restore(daemon, rng)
    del src
    daemon.cli("restore", "src", "--from", "c1", "--undo",
               "--rate", "64K" if long_mode else "256K")
    seen = []
    for k in range(110 if long_mode else 12):
        h = daemon.connect("src")
        for _ in range(rng.randrange(1, 6)):
            # seldom into a pending extent: its capture takes its block along
            i = rng.choice(sorted(pending)) if rng.random() < 0.15 else rng.randrange(SIZE // EXT)
            if rng.random() < 0.5:
                h.pwrite(os.urandom(4096), i * EXT + rng.randrange(0, EXT, 4096))
            else:
                h.pwrite(os.urandom(EXT), i * EXT)
        time.sleep(rng.uniform(0.05, 0.6))  # the job captures and copies meanwhile
        del h
        daemon.kill()
        seen.append(check_crash_rule(daemon, before, pending))
        daemon.start()
        if (restore_status(daemon, "src") or {}).get("state") == "done":
            break
    print(f"{len(seen)} kills; captured after each: {seen}")
    assert not long_mode or len(seen) >= 100, f"only {len(seen)} kills before the end"
    daemon.cli("restore", "rate", "src", "0", check=False)  # it may be done already
    wait_restore_done(daemon, "src")
    captured = read_bitmap(daemon.state_dir, "src", "captured")
    assert captured == pending
    assert rebuilt_pre_restore(daemon, clone_data, captured) == before
    assert whole(daemon.connect("c1"), SIZE) == clone_data


# -- item 3: when undo is no longer possible, say so, never undo wrongly ---------

def kept_point(daemon, seed: int):
    """A finished restore of src from c1 that kept its undo image."""
    before, clone_data, pending, src = before_restore(daemon, random.Random(seed))
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--wait")
    assert daemon.json("status", "src")["undo"]["state"] == "kept"
    return clone_data, pending


def point_intact(daemon, clone_data: bytes, pending: set[int]) -> None:
    assert daemon.json("status", "src")["undo"]["captured_extents"] == len(pending)
    assert read_bitmap(daemon.state_dir, "src", "captured") == pending
    assert os.path.exists(undo_path(daemon))
    assert whole(daemon.connect("c1"), SIZE) == clone_data


def point_gone(daemon) -> None:
    assert daemon.json("status", "src")["undo"] is None
    assert read_bitmap(daemon.state_dir, "src", "captured") == set()
    assert not os.path.exists(undo_path(daemon))


@pytest.mark.parametrize("args", [["clone", "sync", "c1"], ["clone", "delete", "c1"],
                                  ["restore", "src", "--from", "c1"]],
                         ids=["sync", "delete", "restore"])
def test_a_change_that_breaks_the_undo_point_is_refused(daemon, args):
    """One line naming the point and how to drop it; nothing changed."""
    clone_data, pending = kept_point(daemon, 8)
    r = daemon.cli(*args, check=False)
    assert r.returncode != 0
    msg = r.stderr.strip()
    assert "\n" not in msg and "undo point" in msg and "restore forget src" in msg, msg
    point_intact(daemon, clone_data, pending)
    daemon.cli(*args, "--force")
    point_gone(daemon)


def test_a_dry_run_says_what_a_restore_would_say_of_the_point(daemon):
    clone_data, pending = kept_point(daemon, 18)
    r = daemon.cli("restore", "src", "--from", "c1", "--dry-run", check=False)
    assert r.returncode != 0 and "has an undo point" in r.stderr
    assert daemon.json("restore", "src", "--from", "c1", "--dry-run", "--force")["extents"] >= 0
    point_intact(daemon, clone_data, pending)


def test_a_forced_delete_refused_for_another_reason_keeps_the_point(daemon):
    """--force drops the point only with the change it makes way for: a
    delete refused (the clone has a connection) leaves the point whole."""
    clone_data, pending = kept_point(daemon, 15)
    h = daemon.connect("c1")
    r = daemon.cli("clone", "delete", "c1", "--force", check=False)
    assert r.returncode != 0 and "open connection" in r.stderr, r.stderr
    del h
    point_intact(daemon, clone_data, pending)


def test_a_write_to_the_clone_is_refused_while_it_holds_the_point(daemon):
    import nbd
    clone_data, pending = kept_point(daemon, 9)
    h = daemon.connect("c1")
    with pytest.raises(nbd.Error) as e:  # EROFS goes over NBD as EPERM
        h.pwrite(os.urandom(4096), 0)
    assert "not permitted" in str(e.value)
    del h
    point_intact(daemon, clone_data, pending)
    daemon.cli("restore", "forget", "src")
    point_gone(daemon)
    h = daemon.connect("c1")
    h.pwrite(os.urandom(4096), 0)  # the clone is a plain fractured clone again


def test_forget_refuses_what_it_cannot_do(daemon):
    before, clone_data, pending, src = before_restore(daemon, random.Random(10))
    r = daemon.cli("restore", "forget", "src", check=False)
    assert r.returncode != 0 and "src has no undo point" in r.stderr
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--rate", "64K")
    r = daemon.cli("restore", "forget", "src", check=False)
    assert r.returncode != 0 and "once it is done" in r.stderr
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    daemon.cli("restore", "forget", "src")
    point_gone(daemon)


def test_the_point_survives_a_restart(daemon):
    clone_data, pending = kept_point(daemon, 12)
    daemon.stop()
    daemon.start()
    point_intact(daemon, clone_data, pending)
    r = daemon.cli("clone", "delete", "c1", check=False)
    assert r.returncode != 0 and "undo point" in r.stderr


def test_undo_needs_a_protected_restore(daemon):
    before_restore(daemon, random.Random(13))
    r = daemon.cli("restore", "src", "--from", "c1", "--undo", "--unprotected", check=False)
    assert r.returncode != 0 and "--undo needs a protected restore" in r.stderr
    assert "\n" not in r.stderr.strip()
    assert daemon.json("status", "src")["restore"] is None
    assert not os.path.exists(undo_path(daemon))


def test_a_missing_image_drops_the_point_for_good(daemon):
    """An undo image deleted behind the daemon's back: at the next start
    the point is dropped from the metadata (never paired with a later
    image), and the clone is free again."""
    kept_point(daemon, 14)
    daemon.stop()
    os.unlink(undo_path(daemon))
    daemon.start()
    point_gone(daemon)
    assert "undo image" in daemon.log() and "is missing" in daemon.log()
    daemon.cli("clone", "delete", "c1")


@pytest.mark.parametrize("how", ["forget", "force"])
def test_a_point_whose_clone_is_missing_can_still_be_dropped(daemon, how):
    """The clone's file is gone at start-up: the point stays in the
    metadata (the file may come back), so deleting the clone's record
    refuses with the usual line; 'restore forget' drops the point (its
    captured map and its image), or 'delete --force' drops it with the
    clone.  Neither leaves an image no command can reach."""
    kept_point(daemon, 15)
    daemon.stop()
    os.unlink(daemon.volume_path("c1"))
    daemon.start()
    r = daemon.cli("delete", "c1", check=False)
    assert r.returncode != 0 and "lunclone restore forget src" in r.stderr
    assert "\n" not in r.stderr.strip()
    assert os.path.exists(undo_path(daemon))
    if how == "forget":
        daemon.cli("restore", "forget", "src")
        daemon.cli("delete", "c1")
    else:
        r = daemon.cli("delete", "c1", "--force")
    assert read_bitmap(daemon.state_dir, "src", "captured") == set()
    assert not os.path.exists(undo_path(daemon))
    assert "c1" not in daemon.cli("list").stdout
    daemon.stop()
    daemon.start()
    r = daemon.cli("restore", "forget", "src", check=False)
    assert r.returncode != 0 and "has no undo point" in r.stderr


def test_a_point_whose_clone_and_image_are_missing_is_dropped(daemon):
    """The image and the clone's file both gone at start-up: the point
    cannot be used (its data was in the image), so it is dropped as when
    the clone is there; status does not show it, and nothing refuses
    because of it."""
    kept_point(daemon, 18)
    synchronize_and_fracture(daemon, "src", "c2")
    daemon.stop()
    os.unlink(undo_path(daemon))
    os.unlink(daemon.volume_path("c1"))
    daemon.start()
    assert daemon.json("status", "src")["undo"] is None
    assert read_bitmap(daemon.state_dir, "src", "captured") == set()
    daemon.cli("restore", "src", "--from", "c2", "--wait")  # no --force needed
    daemon.cli("delete", "c1")


def test_a_point_whose_clone_is_missing_refuses_a_new_restore(daemon):
    """The point in the metadata only (its clone's file missing at
    start-up) still counts: a restore from another clone refuses to drop
    it, with the usual line; with --force it goes, image and all."""
    kept_point(daemon, 16)
    synchronize_and_fracture(daemon, "src", "c2")
    daemon.stop()
    os.unlink(daemon.volume_path("c1"))
    daemon.start()
    r = daemon.cli("restore", "src", "--from", "c2", check=False)
    assert r.returncode != 0 and "has an undo point (its restore from c1)" in r.stderr
    assert "\n" not in r.stderr.strip()
    assert read_bitmap(daemon.state_dir, "src", "captured")
    daemon.cli("restore", "src", "--from", "c2", "--force", "--wait")
    assert read_bitmap(daemon.state_dir, "src", "captured") == set()
    assert not os.path.exists(undo_path(daemon))


def test_status_shows_a_clone_and_a_point_kept_in_the_metadata_only(daemon):
    """c1's file is missing at start-up: commands refuse because of c1 and
    of src's undo point, so status shows both (c1 among src's clones with
    the error that keeps it unserved, the point as kept), in JSON and in
    the human text, and the finished restore from c1 as before."""
    kept_point(daemon, 17)
    captured = len(read_bitmap(daemon.state_dir, "src", "captured"))
    before = daemon.json("status", "src")
    daemon.stop()
    os.unlink(daemon.volume_path("c1"))
    daemon.start()
    st = daemon.json("status", "src")
    with open(SCHEMA_PATH) as f:
        check(json.load(f), "status", st)  # the JSON contract holds
    assert st["undo"] == {"from": "c1", "captured_extents": captured, "state": "kept",
                          "bytes": before["undo"]["bytes"]}
    progress = ("copied_bytes", "rate_bytes_per_s", "eta_s")
    assert {k: v for k, v in st["restore"].items() if k not in progress} == {
        k: v for k, v in before["restore"].items() if k not in progress}  # done, from c1
    (c1,) = st["clones"]
    assert c1["name"] == "c1" and c1["state"] == before["clones"][0]["state"]
    assert c1["delta_extents"] == SIZE // EXT  # away while src is served: distrusted
    assert "missing" in c1["error"] or "no such file" in c1["error"].lower(), c1["error"]
    text = daemon.cli("status", "src").stdout
    assert "clone c1:" in text and "error:" in text and "undo" in text
    assert 'lunclone_clone_error{source="src",clone="c1"} 1' in daemon.cli("metrics").stdout
    # and the commands that need c1 say why they cannot, in one line
    for command in (["restore", "undo", "src"], ["restore", "src", "--from", "c1", "--force"],
                    ["clone", "fracture", "c1"], ["clone", "diff", "c1"]):
        r = daemon.cli(*command, check=False)
        assert r.returncode != 0 and "not served" in r.stderr, (command, r.stderr)
        assert "\n" not in r.stderr.strip() and "not a clone" not in r.stderr


def test_a_full_disk_while_capturing_pauses_and_overwrites_nothing_uncaptured(daemon):
    """The undo directory on a tmpfs with room for a few extents: the
    restore pauses with the error in status; every extent not captured
    still holds its pre-restore data in the source, every captured one has
    it in the undo image; the host still reads the clone's data.  With
    room again, resume finishes and the pre-restore image is whole."""
    import subprocess
    from helpers import wait_for
    before, clone_data, pending, src = before_restore(daemon, random.Random(16))
    undo_dir = os.path.dirname(undo_path(daemon))
    os.makedirs(undo_dir, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", undo_dir]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        daemon.cli("restore", "src", "--from", "c1", "--undo")
        err = wait_for(lambda: (daemon.json("status", "src")["restore"] or {}).get("error"),
                       60, what="the restore to pause on ENOSPC")
        assert "space" in err, err
        assert daemon.json("status", "src")["restore"]["state"] == "paused"
        for i in sorted(pending)[:4]:  # reads of pending extents: the clone's data
            assert src.pread(EXT, i * EXT) == clone_data[i * EXT:(i + 1) * EXT]
        captured = read_bitmap(daemon.state_dir, "src", "captured")
        assert len(captured) < len(pending)
        with open(daemon.volume_path("src"), "rb") as f:
            source_file = f.read()
        for i in pending - captured:  # never overwritten
            assert source_file[i * EXT:(i + 1) * EXT] == before[i * EXT:(i + 1) * EXT], i
        for i in captured:
            assert read_extent(undo_path(daemon), i) == before[i * EXT:(i + 1) * EXT], i
        subprocess.run(["mount", "-o", "remount,size=64m", undo_dir], check=True)
        daemon.cli("restore", "resume", "src")
        wait_restore_done(daemon, "src")
        captured = read_bitmap(daemon.state_dir, "src", "captured")
        assert captured == pending
        assert rebuilt_pre_restore(daemon, clone_data, captured) == before
        assert whole(src, SIZE) == clone_data
    finally:
        del src
        daemon.stop()
        subprocess.run(["umount", "-l", undo_dir])


def test_undo_after_the_restore_brings_back_the_pre_restore_image(daemon):
    """A restore with --undo under host I/O on four connections, host
    writes after it, then ``restore undo`` under host I/O on four
    connections: every byte of the source is the pre-restore image plus
    the writes made during the undo (the model); the clone is untouched;
    its delta map is the first restore's pending set plus the undo's
    writes; the point is used up and its image gone."""
    rng = random.Random(21)
    before, clone_data, pending, src = before_restore(daemon, rng)
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--rate", "64K")
    host_io_during_restore(daemon, src, clone_data, 200, 60)
    src.pwrite(b"\x5a" * (3 * EXT), 40 * EXT + 100)  # after it: in the clone's delta
    src.flush()
    out = daemon.cli("restore", "undo", "src", "--rate", "64K").stdout
    assert "shows its data from before that restore now" in out
    st = daemon.json("status", "src")
    assert st["restore"]["kind"] == "undo" and st["undo"]["state"] == "undoing"
    assert "undo of the restore from c1: running" in daemon.cli("status", "src").stdout
    model, touched = host_io_during_restore(daemon, src, before, 300, 60)
    assert whole(daemon.connect("c1"), SIZE) == clone_data
    st = daemon.json("status", "src")
    assert st["undo"] is None and st["restore"]["state"] == "done"
    assert not os.path.exists(undo_path(daemon))
    assert read_bitmap(daemon.state_dir, "c1", "delta") == pending | touched
    assert read_bitmap(daemon.state_dir, "src", "captured") == set()
    del src  # nbdkit waits for its clients before it exits
    daemon.stop()
    daemon.start()
    assert whole(daemon.connect("src"), SIZE) == bytes(model)


def test_sigkill_during_undo_loses_nothing(daemon, long_mode):
    """SIGKILL at random moments of a rate-limited undo with a writer doing
    partial and whole-extent writes (flushed before the kill):
    once the undo is done, every byte is the pre-restore image with those
    writes on top, and the clone's delta map is the first restore's
    pending set plus the extents written.  (12 kills; with --long 100 or
    more, at a quarter of the rate so that the undo lasts.)"""
    rng = random.Random(29)
    before, clone_data, pending, src = before_restore(daemon, rng)
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--wait")
    daemon.cli("restore", "undo", "src", "--rate", "64K" if long_mode else "256K")
    model, written, kills = bytearray(before), set(), 0
    for k in range(110 if long_mode else 12):
        h = daemon.connect("src")
        time.sleep(rng.uniform(0.05, 0.6))  # the undo copies meanwhile
        for _ in range(rng.randrange(1, 6)):  # a few writes: most extents keep their data
            i = rng.randrange(SIZE // EXT)
            off, n = (i * EXT + rng.randrange(0, EXT, 4096), 4096) if rng.random() < 0.5 \
                else (i * EXT, EXT)
            data = os.urandom(n)
            h.pwrite(data, off)
            model[off:off + n] = data
            written.add(i)
        h.flush()  # only flushed writes must survive a crash (rule 3)
        del h
        daemon.kill()
        kills += 1
        daemon.start()
        if (restore_status(daemon, "src") or {}).get("state") == "done":
            break
    print(f"{kills} kills")
    assert not long_mode or kills >= 100, f"only {kills} kills before the end"
    daemon.cli("restore", "rate", "src", "0", check=False)
    wait_restore_done(daemon, "src")
    assert whole(daemon.connect("src"), SIZE) == bytes(model)
    assert whole(daemon.connect("c1"), SIZE) == clone_data
    assert read_bitmap(daemon.state_dir, "c1", "delta") == pending | written
    assert not os.path.exists(undo_path(daemon))


def test_undo_refuses_what_it_cannot_do(daemon):
    """One line each, nothing changed: no point (a restore without --undo),
    an unknown volume, a bad name; and the point is used up by an undo."""
    before, clone_data, pending, src = before_restore(daemon, random.Random(31))
    for args, words in ((["nope"], "no volume named"), (["a/b"], "invalid name"),
                        (["src"], "src has no undo point")):
        r = daemon.cli("restore", "undo", *args, check=False)
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--wait")
    daemon.cli("restore", "undo", "src", "--wait")
    assert whole(src, SIZE) == before
    r = daemon.cli("restore", "undo", "src", check=False)
    assert r.returncode != 0 and "src has no undo point" in r.stderr
    del src


def test_during_an_undo_clone_diff_covers_the_pre_restore_data(daemon):
    """The source shows the pre-restore data in the captured extents, so
    ``clone diff`` (what an audit tool reads) includes them; a second undo
    is refused while one runs."""
    clone_data, pending = kept_point(daemon, 33)
    daemon.cli("restore", "undo", "src", "--rate", "64K")
    ranges = daemon.json("clone", "diff", "c1")
    covered = {i for r in ranges for i in range(r["offset"] // EXT,
                                               (r["offset"] + r["length"] - 1) // EXT + 1)}
    assert pending <= covered, sorted(pending - covered)[:8]
    r = daemon.cli("restore", "undo", "src", check=False)
    assert r.returncode != 0 and "the undo of src is running already" in r.stderr, r.stderr
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    assert daemon.json("clone", "diff", "c1") == ranges  # the captured set, as before


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_undo_while_the_restore_runs(daemon, paused):
    """``restore undo`` while the ``--undo`` restore still runs (or is
    paused), host I/O on four connections during both: one transaction
    ends the restore and starts the undo; the source ends as the
    pre-restore image plus the writes made during the undo (the model),
    the clone untouched, its delta map the first restore's pending set
    plus the undo's writes."""
    before, clone_data, pending, src = before_restore(daemon, random.Random(41))
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--rate", "64K")
    host_io(daemon, src, clone_data, 500, 40)  # copies on demand, captures
    if paused:
        daemon.cli("restore", "pause", "src")
    assert 0 < restore_status(daemon, "src")["pending_extents"]
    daemon.cli("restore", "undo", "src", "--rate", "64K")
    st = daemon.json("status", "src")
    assert st["restore"]["kind"] == "undo" and st["undo"]["state"] == "undoing"
    model, touched = host_io_during_restore(daemon, src, before, 600, 40)
    assert whole(daemon.connect("c1"), SIZE) == clone_data
    assert read_bitmap(daemon.state_dir, "c1", "delta") == pending | touched
    assert daemon.json("status", "src")["undo"] is None
    del src
    daemon.stop()
    daemon.start()
    assert whole(daemon.connect("src"), SIZE) == bytes(model)


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_around_an_undo_of_a_running_restore(daemon, seed):
    """SIGKILL at a random moment around ``restore undo`` of a running
    ``--undo`` restore (before, during or after its transaction): after the
    restart the undo runs (killed before its transaction: the restore
    does, and is undone then), a few flushed writes, another SIGKILL; in
    the end the source is the pre-restore image plus those writes, the
    clone untouched, its delta map the pending set plus those writes."""
    rng = random.Random(43 + seed)
    before, clone_data, pending, src = before_restore(daemon, rng)
    del src
    daemon.cli("restore", "src", "--from", "c1", "--undo", "--rate", "128K")
    time.sleep(rng.uniform(0.1, 0.5))
    undo = subprocess_popen(daemon, "restore", "undo", "src", "--rate", "256K")
    time.sleep(rng.uniform(0.0, 0.05))
    daemon.kill()
    undo.wait(30)
    daemon.start()
    if restore_status(daemon, "src")["kind"] != "undo":  # killed before the switch
        daemon.cli("restore", "undo", "src", "--rate", "256K")
    model, written = bytearray(before), set()
    h = daemon.connect("src")
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(SIZE // EXT)
        data = os.urandom(4096)
        off = i * EXT + rng.randrange(0, EXT, 4096)
        h.pwrite(data, off)
        model[off:off + 4096] = data
        written.add(i)
    h.flush()
    del h
    daemon.kill()
    daemon.start()
    daemon.cli("restore", "rate", "src", "0", check=False)
    wait_restore_done(daemon, "src")
    assert whole(daemon.connect("src"), SIZE) == bytes(model)
    assert whole(daemon.connect("c1"), SIZE) == clone_data
    assert read_bitmap(daemon.state_dir, "c1", "delta") == pending | written


def subprocess_popen(daemon, *args):
    import subprocess
    from helpers import LUNCLONE
    return subprocess.Popen([LUNCLONE, *args, "--run-dir", daemon.run_dir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
