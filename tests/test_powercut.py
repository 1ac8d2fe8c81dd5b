"""Power cuts against the real daemon: nbdkit + plugin + SQLite with the whole
state directory on LazyFS (tests/lazyfs.py), which keeps only what was
fsynced (and names whose directory was fsynced).

Each cut: a source with data and a clone in the phase under test, a host
writer (libnbd) doing random writes with a flush every few writes (or FUA
writes), then, at a random moment, SIGKILL of the daemon and a torn power
cut (``power_cut(tear=True)``: a random half of the unsynced 4 KiB blocks
reach the disk).  Then, on the durable state before the daemon restarts:

- every extent where source and clone differ has its bit (delta; during a
  restore pending or protected);
- a protected restore never changed the clone;

and after the restart:

- a running restore resumes by itself and finishes; the source then holds,
  in every 4 KiB block, a value the host may see: the value of its last
  write acknowledged before a completed flush (or with FUA), or of a later
  write (``BlockModel``);
- a sync resumes by itself and the clone ends equal to the source;
- a clone deleted before the cut stays deleted, and its name can be reused;
- after a clean stop the persisted delta map covers every differing extent.

Phase ``restore-undo`` keeps an undo image: at the cut, each extent the
restore copies is captured (its pre-restore data durable in the undo image)
or holds its pre-restore data in the source; once done, the undo image and
the clone give back the pre-restore source.

Phase ``undo``: ``restore undo`` of a finished restore that kept its undo
image: at the cut, every extent where the source differs from the
pre-restore image is pending or protected, each captured extent's
pre-restore data is durable in the undo image, each pending extent not
captured holds it in the clone, and the clone is unchanged; once done,
the source holds the pre-restore image plus the host's writes
(``BlockModel``).

Phase ``undo-running``: ``restore undo`` while a ``--undo`` restore runs
(the writer stopped around the switch, another one on the pre-restore
image once the command returned): at the cut, as in the phases above for
whichever job the disk holds; after the restart, an acknowledged undo is
the job, and the source ends as its model says (the restore's if the
switch is not durable).

Phase ``restore-writeback-error``: during a protected restore one fdatasync
of the source's file fails (LazyFS drops its unsynced data, as Linux does);
the writer stops at its failed flush, and the same checks hold.

CI runs a few cuts per phase; ``--long`` runs 300+ and prints the figures.
``python tests/test_powercut.py PHASE --cuts N`` runs one phase from the
command line and stops at the first problem (to show that the test can fail).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import nbd
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import (LUNCLONE, Daemon, clone_state, differing_extents,  # noqa: E402
                     short_tmpdir, wait_clone_state, wait_for)
from lazyfs import LazyFS, unavailable  # noqa: E402

MiB = 1 << 20
SIZE = 8 * MiB
EXT = 64 * 1024
BLOCK = 4096


# ---------------------------------------------------------------- the model

class BlockModel:
    """What each 4 KiB block of the source may hold after a power cut.

    ``data`` is the newest content (every write issued applied).  A block
    some write has touched since its last certain write has older allowed
    values in ``olds``: ``(seq, value before write seq)``.  A completed flush
    makes every write acknowledged before it certain; so does FUA for the
    blocks the write covers whole.  LazyFS keeps, per 4 KiB block, either its
    content at the last fsync or its live content, both of which are values
    of some prefix of the writes, so each block is checked on its own.
    """

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.olds: dict[int, list[tuple[int, bytes]]] = {}
        self.seq = 0
        self.lock = threading.Lock()

    def issue(self, off: int, new: bytes) -> int:
        """A write is about to be sent: until it is certain, old or new."""
        with self.lock:
            self.seq += 1
            end = off + len(new)
            for b in range(off // BLOCK, (end - 1) // BLOCK + 1):
                self.olds.setdefault(b, []).append(
                    (self.seq, bytes(self.data[b * BLOCK:(b + 1) * BLOCK])))
            self.data[off:end] = new
            return self.seq

    def fua_done(self, seq: int, off: int, length: int) -> None:
        """Write ``seq`` returned with FUA: the blocks it covers whole are certain."""
        with self.lock:
            for b in range(-(-off // BLOCK), (off + length) // BLOCK):
                self._certain(b, seq)

    def flushed(self, upto: int) -> None:
        """A flush sent after write ``upto`` returned has completed."""
        with self.lock:
            for b in list(self.olds):
                self._certain(b, upto)

    def _certain(self, b: int, upto: int) -> None:
        left = [e for e in self.olds.get(b, ()) if e[0] > upto]
        if left:
            self.olds[b] = left
        else:
            self.olds.pop(b, None)

    def mismatches(self, got: bytes) -> list[int]:
        """Offsets of the blocks of ``got`` (the whole volume) no allowed value explains."""
        bad = []
        with self.lock:
            for b in range(len(got) // BLOCK):
                blk = got[b * BLOCK:(b + 1) * BLOCK]
                if blk != self.data[b * BLOCK:(b + 1) * BLOCK] and \
                        all(blk != v for _, v in self.olds.get(b, ())):
                    bad.append(b * BLOCK)
        return bad


class Writer(threading.Thread):
    """Random writes (and a few trims) to the source on one connection, a
    flush every few writes; ``fua``: about half the writes carry FUA.  Ends
    at the first error (the daemon was killed)."""

    def __init__(self, daemon: Daemon, model: BlockModel, rng: random.Random, fua: bool):
        super().__init__(daemon=True)
        self.h = daemon.connect("src")
        self.model, self.rng, self.fua = model, rng, fua
        self.acked = self.flushes = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._loop()
        except nbd.Error:
            pass                        # the daemon died: what was flushed counts
        except BaseException as e:      # a bug in the test itself
            self.error = e
        finally:
            del self.h

    def _loop(self) -> None:
        rng, h, model = self.rng, self.h, self.model
        since_flush = 0
        while not self.stop.is_set():
            off, new, trim = self._pick()
            fua = self.fua and rng.random() < 0.5
            seq = model.issue(off, new)
            if trim:
                h.trim(len(new), off, nbd.CMD_FLAG_FUA if fua else 0)
            else:
                h.pwrite(new, off, nbd.CMD_FLAG_FUA if fua else 0)
            self.acked += 1
            if fua:
                model.fua_done(seq, off, len(new))
            since_flush += 1
            if since_flush >= rng.randint(2, 6):
                h.flush()
                model.flushed(seq)
                self.flushes += 1
                since_flush = 0
            time.sleep(rng.uniform(0, 0.01))

    def _pick(self) -> tuple[int, bytes, bool]:
        rng = self.rng
        kind = rng.choice(["partial", "partial", "extent", "trim"])
        if kind == "extent":
            off, ln = rng.randrange(SIZE // EXT) * EXT, EXT
        elif kind == "trim":
            off, ln = rng.randrange(SIZE // BLOCK - 16) * BLOCK, rng.choice([BLOCK, EXT])
        else:
            ln = rng.choice([512, 4096, 12800])
            off = rng.randrange((SIZE - ln) // 512) * 512
        return off, (bytes(ln) if kind == "trim" else rng.randbytes(ln)), kind == "trim"


# ---------------------------------------------------------------- the durable state

@dataclass
class Durable:
    """What the disk holds after the cut, read before the daemon restarts."""
    src: bytes
    clone: bytes | None
    clone_state: str | None
    job: tuple[str, str] | None          # (kind, state) of the source's job row
    maps: dict[str, set[int]] = field(default_factory=dict)
    undo: bytes | None = None            # the source's undo image, if there is one


def read_durable(backing: str) -> Durable:
    """Read the backing directory after a power cut (not through the mount:
    nothing is changed, the database is opened on a copy)."""
    tmp = short_tmpdir("pcdb")
    try:
        for name in ("lunclone.db", "lunclone.db-wal"):
            if os.path.exists(os.path.join(backing, name)):
                shutil.copy(os.path.join(backing, name), tmp)
        db = sqlite3.connect(os.path.join(tmp, "lunclone.db"))
        try:
            row = db.execute("SELECT clone_state FROM volumes WHERE name='c1'").fetchone()
            job = db.execute("SELECT kind, state FROM jobs WHERE source='src'").fetchone()
            maps = {}
            for owner, kind in (("c1", "delta"), ("src", "pending"), ("src", "protected"),
                                ("src", "captured")):
                maps[kind] = bits(db.execute(
                    "SELECT page, bits FROM bitmaps WHERE owner=? AND kind=?", (owner, kind)))
        finally:
            db.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    clone_path = os.path.join(backing, "volumes", "c1.img")
    undo_path = os.path.join(backing, "undo", "src.img")
    return Durable(read_file(os.path.join(backing, "volumes", "src.img")),
                   read_file(clone_path) if row and os.path.exists(clone_path) else None,
                   row[0] if row else None, job, maps,
                   read_file(undo_path) if os.path.exists(undo_path) else None)


def bits(rows) -> set[int]:
    out = set()
    for page, data in rows:
        base = page * len(data) * 8
        for j, byte in enumerate(data):
            for k in range(8):
                if byte >> k & 1:
                    out.add(base + j * 8 + k)
    return out


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read().ljust(SIZE, b"\0")


def whole(daemon: Daemon, name: str) -> bytes:
    h = daemon.connect(name)
    try:
        return b"".join(h.pread(2 * MiB, off) for off in range(0, SIZE, 2 * MiB))
    finally:
        del h


# ---------------------------------------------------------------- phases

@dataclass
class Run:
    """One cut: what the phase set up and what the checks found."""
    phase: str
    seed: int
    daemon: Daemon
    rng: random.Random
    clone_data: bytes | None = None     # the clone at fracture (restore phases)
    pre_restore: bytes | None = None    # the source just before a protected restore
    undo_target: bytes | None = None    # phase undo: the pre-restore image it goes back to
    cmd: subprocess.Popen | None = None  # the phase's admin command
    writers: list = field(default_factory=list)  # every Writer started, in order
    undo_model: BlockModel | None = None  # phase undo-running: the model after the switch
    acting: threading.Thread | None = None  # an act that goes on beside the cut
    fs: LazyFS | None = None
    acked: bool = False                  # it returned success before the cut
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def deleted(self) -> bool:
        """clone delete returned before the cut."""
        return self.phase == "clone-delete" and self.acked

    @property
    def may_lack_clone(self) -> bool:
        """The cut may have come before the clone was created or after it was deleted."""
        return self.phase == "clone-delete" or (self.phase == "initial-sync" and not self.acked)

    def problem(self, msg: str) -> None:
        self.problems.append(msg)


def fill(daemon: Daemon, rng: random.Random) -> bytes:
    """src with random data in most extents, flushed: returns its content."""
    daemon.cli("create", "src", "--size", str(SIZE), "--extent-size", str(EXT))
    data = bytearray(SIZE)
    h = daemon.connect("src")
    for off in range(0, SIZE, EXT):
        if rng.random() < 0.75:
            data[off:off + EXT] = rng.randbytes(EXT)
    h.pwrite(bytes(data), 0)
    h.flush()
    del h
    return bytes(data)


def fractured(daemon: Daemon, rng: random.Random, damaged: int) -> tuple[bytes, bytes]:
    """A synchronized then fractured clone c1, then ``damaged`` extents of src
    changed (some trimmed): returns (clone content, source content)."""
    data = bytearray(fill(daemon, rng))
    daemon.cli("clone", "create", "src", "c1")
    wait_clone_state(daemon, "src", "c1", "synchronized")
    daemon.cli("clone", "fracture", "c1")
    clone = bytes(data)
    h = daemon.connect("src")
    for e in rng.sample(range(SIZE // EXT), damaged):
        new = bytes(EXT) if rng.random() < 0.2 else rng.randbytes(EXT)
        (h.trim(EXT, e * EXT) if not any(new) else h.pwrite(new, e * EXT))
        data[e * EXT:(e + 1) * EXT] = new
    h.flush()
    del h
    return clone, bytes(data)


def setup_sync(run: Run) -> bytes:
    return fill(run.daemon, run.rng)


def setup_mirror(run: Run) -> bytes:
    data = fill(run.daemon, run.rng)
    run.daemon.cli("clone", "create", "src", "c1")
    wait_clone_state(run.daemon, "src", "c1", "synchronized")
    return data


def setup_resync(run: Run) -> bytes:
    run.clone_data, data = fractured(run.daemon, run.rng, damaged=60)
    return data


def background(*args: str) -> Callable[[Run], None]:
    """An admin command started while the writer writes: the cut may come
    before or after it returns (``Run.acked``)."""
    def act(run: Run) -> None:
        run.cmd = subprocess.Popen([LUNCLONE, *args, "--run-dir", run.daemon.run_dir],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return act


def restore_setup(protected: bool, damaged: int, rate: str | None,
                  undo: bool = False) -> Callable[[Run], bytes]:
    def setup(run: Run) -> bytes:
        run.clone_data, before = fractured(run.daemon, run.rng, damaged)
        if undo:  # its undo image is checked (rule 5)
            run.pre_restore = before
        run.daemon.cli("restore", "src", "--from", "c1",
                       *([] if protected else ["--unprotected"]),
                       *(["--undo"] if undo else []),
                       *(["--rate", rate] if rate else []))
        return run.clone_data             # the source shows the clone's data now
    return setup


def undo_running_setup(run: Run) -> bytes:
    """A restore with --undo at 4 MiB/s; ``undo_while_running`` undoes it."""
    shows = restore_setup(True, 80, "4M", undo=True)(run)
    run.undo_target = run.pre_restore
    return shows


def undo_setup(run: Run) -> bytes:
    """A restore with --undo, done; then ``restore undo`` at 4 MiB/s."""
    run.clone_data, before = fractured(run.daemon, run.rng, 80)
    run.daemon.cli("restore", "src", "--from", "c1", "--undo", "--wait")
    run.undo_target = before
    run.daemon.cli("restore", "undo", "src", "--rate", "4M")
    return before                         # the source shows the pre-restore data now


def undo_while_running(run: Run) -> None:
    """``restore undo`` while the restore runs, the writer stopped around
    the switch (a write in flight at the switch may land before or after
    it: the model cannot tell), then a new writer on the pre-restore image
    once the command returned.  Runs beside the cut."""
    def act() -> None:
        try:
            time.sleep(run.rng.uniform(0, 0.3))
            first = run.writers[0]
            first.stop.set()
            first.join(30)
            run.undo_model = BlockModel(run.pre_restore)
            p = run.daemon.cli("restore", "undo", "src", "--rate", "4M", check=False)
            run.acked = p.returncode == 0
            if run.acked:
                run.notes.append("undo acknowledged")
                second = Writer(run.daemon, run.undo_model, random.Random(run.seed + 2),
                                first.fua)
                run.writers.append(second)
                second.start()
        except Exception as e:  # the cut came first: the daemon is gone
            run.notes.append(f"act stopped by the cut: {type(e).__name__}")
    run.acting = threading.Thread(target=act, daemon=True)
    run.acting.start()


def fail_writeback(pattern: str) -> Callable[[Run], None]:
    """A little later, the next fdatasync of the files matching ``pattern``
    fails with EIO and their unsynced data is dropped (Linux's writeback
    error): the volume must report it and keep every bit that needed it."""
    def act(run: Run) -> None:
        time.sleep(run.rng.uniform(0, 0.3))
        run.fs.fail_fsync(pattern)
        run.notes.append(f"fdatasync of {pattern} fails once")
    return act


def setup_delete(run: Run) -> bytes:
    run.clone_data, data = fractured(run.daemon, run.rng, damaged=20)
    return data


@dataclass
class Phase:
    """``setup`` runs before the writer starts and returns the source's
    content; ``act`` runs once the writer is writing; the cut comes a random
    time in ``window`` (seconds) after that."""
    name: str
    setup: Callable[[Run], bytes]
    window: tuple[float, float]
    act: Callable[[Run], None] | None = None
    restore: bool = False
    protected: bool = True
    delete: bool = False
    writeback_error: bool = False  # a restore paused by it is resumed after the restart


PHASES = {p.name: p for p in [
    Phase("initial-sync", setup_sync, (0.0, 0.3),
          background("clone", "create", "src", "c1")),
    Phase("mirror", setup_mirror, (0.05, 1.5)),
    Phase("resync", setup_resync, (0.0, 0.3),
          background("clone", "sync", "c1")),
    Phase("restore", restore_setup(True, 80, "4M"), (0.05, 1.2), restore=True),
    # keeping an undo image: each extent's pre-restore data is captured
    # before the restore or a host write overwrites it (rule 5)
    Phase("restore-undo", restore_setup(True, 80, "4M", undo=True), (0.05, 1.2),
          restore=True),
    # back to the pre-restore image: from the undo image where captured,
    # from the clone elsewhere
    Phase("undo", undo_setup, (0.05, 1.2), restore=True),
    # undo of a running restore: one transaction swaps the restore for the
    # undo (pending := captured + protected); the cut before, during or after
    Phase("undo-running", undo_running_setup, (0.1, 1.4),
          undo_while_running, restore=True),
    Phase("restore-unprotected", restore_setup(False, 80, "4M"), (0.05, 1.2),
          restore=True, protected=False),
    Phase("restore-finish", restore_setup(True, 6, "1M"), (0.15, 0.6), restore=True),
    Phase("clone-delete", setup_delete, (0.0, 0.3),
          background("clone", "delete", "c1"), delete=True),
    Phase("restore-writeback-error", restore_setup(True, 80, "4M"), (0.05, 0.8),
          fail_writeback("volumes/src.img"), restore=True, writeback_error=True),
]}


# ---------------------------------------------------------------- one cut

def one_cut(phase: Phase, seed: int, fua: bool) -> Run:
    top = short_tmpdir("pc")
    fs = LazyFS(os.path.join(top, "disk"), os.path.join(top, "mnt")).mount()
    daemon = Daemon(fs.mountpoint, os.path.join(top, "run"))
    run = Run(phase.name, seed, daemon, random.Random(seed), fs=fs)
    try:
        daemon.start()
        model = BlockModel(phase.setup(run))
        writer = Writer(daemon, model, random.Random(seed + 1), fua)
        run.writers.append(writer)
        writer.start()
        if phase.act:
            time.sleep(run.rng.uniform(0, 0.05))
            phase.act(run)
        time.sleep(run.rng.uniform(*phase.window))
        if run.cmd:
            run.acked = run.cmd.poll() == 0
        daemon.kill()
        fs.power_cut(tear=True, seed=seed)
        if run.acting:
            run.acting.join(60)
        for w in run.writers:
            w.join(30)
            if w.error:
                raise w.error
        if run.cmd:
            run.cmd.wait(30)
        run.notes.append("writers " + ", ".join(f"{w.acked} writes {w.flushes} flushes"
                                                for w in run.writers))
        durable = read_durable(fs.backing)
        check_durable(run, durable)
        check_capture(run, durable)
        fs.mount()
        daemon.start()
        check_after_restart(run, phase, model_after_restart(run, model))
        rc = daemon.stop()
        if rc != 0:
            run.problem(f"daemon exit {rc}")
        check_persisted_delta(run, fs.mountpoint)
    finally:
        daemon.kill()
        fs.unmount()
        shutil.rmtree(top, ignore_errors=True)
    return run


def check_durable(run: Run, d: Durable) -> None:
    """On the disk as the cut left it: differences are covered by bits."""
    run.notes.append(f"at the cut: clone {d.clone_state}, job {d.job}")
    if d.clone is None:
        if not run.may_lack_clone:
            run.problem(f"the clone is gone after the cut (state {d.clone_state})")
        return
    if run.deleted:
        run.problem("clone delete was acknowledged but the clone is back after the cut")
    diff = differing_extents(d.src, d.clone, EXT)
    if d.job is not None and d.job[0] == "undo" and d.job[1] != "done":
        target = check_undo_source(run, d)
        diff = differing_extents(d.src, target, EXT)
        cover, what = d.maps["pending"] | d.maps["protected"], "pending or protected"
    elif d.clone_state == "restoring":
        cover = d.maps["pending"] | d.maps["protected"]
        what = "pending or protected"
    else:
        cover, what = d.maps["delta"], "delta"
    if diff - cover:
        run.problem(f"durable: extents {sorted(diff - cover)[:8]} differ between source "
                    f"and clone without a {what} bit (clone {d.clone_state})")
    if run.clone_data is not None and d.clone_state in ("fractured", "restoring") and \
            run.phase != "restore-unprotected" and d.clone != run.clone_data:
        changed = differing_extents(d.clone, run.clone_data, EXT)
        run.problem(f"durable: the clone changed in extents {sorted(changed)[:8]}")


def check_undo_source(run: Run, d: Durable) -> bytes:
    """During an undo, on the durable files: each captured extent's
    pre-restore data is in the undo image, and each pending extent not
    captured reads it from the clone (an extent the first restore never
    captured still holds it in the source: it is not pending).  Returns the
    pre-restore image, which the source must equal outside its bits."""
    if d.undo is None:
        run.problem("durable: an undo runs but its undo image is gone")
        return run.undo_target
    wrong = sorted(i for i in d.maps["captured"] if d.undo[i * EXT:(i + 1) * EXT]
                   != run.undo_target[i * EXT:(i + 1) * EXT])
    if wrong:
        run.problem(f"durable: the undo image lacks the pre-restore data of captured "
                    f"extents {wrong[:8]}")
    wrong = sorted(i for i in d.maps["pending"] - d.maps["captured"]
                   if d.clone[i * EXT:(i + 1) * EXT] != run.undo_target[i * EXT:(i + 1) * EXT])
    if wrong:
        run.problem(f"durable: pending extents {wrong[:8]} are not captured and the clone "
                    f"does not hold their pre-restore data")
    return run.undo_target


def check_capture(run: Run, d: Durable) -> None:
    """Rule 5 on the disk as the cut left it: each extent of the original
    pending set is captured, its pre-restore data durable in the undo image,
    or still holds its pre-restore data in the source."""
    if run.pre_restore is None or d.job is None or d.job[0] != "restore":
        return
    # (The pending set may hold more: a trim of a zero extent sets a delta bit.)
    captured = d.maps["captured"]
    pending = differing_extents(run.pre_restore, run.clone_data, EXT) | captured
    if captured and d.undo is None:
        run.problem("durable: captured bits but no undo image")
        return
    for i in sorted(pending):
        old = run.pre_restore[i * EXT:(i + 1) * EXT]
        where, data = ("undo image", d.undo) if i in captured else ("source", d.src)
        if data[i * EXT:(i + 1) * EXT] != old:
            run.problem(f"durable: extent {i}: pre-restore data lost (looked in the {where}; "
                        f"captured {len(captured)} of {len(pending)})")
            return
    run.notes.append(f"captured {len(captured)}/{len(pending)}")


def check_undo_image(run: Run) -> None:
    """After the restore is done: every pending extent captured, and the undo
    image + the clone give back the pre-restore source byte for byte."""
    d = read_durable(run.fs.backing)
    pending = differing_extents(run.pre_restore, run.clone_data, EXT)
    if not pending <= d.maps["captured"] or d.undo is None:
        run.problem(f"after the restore: captured {len(d.maps['captured'])} of "
                    f"{len(pending)} extents")
        return
    rebuilt = bytearray(run.clone_data)
    for i in d.maps["captured"]:
        rebuilt[i * EXT:(i + 1) * EXT] = d.undo[i * EXT:(i + 1) * EXT]
    if bytes(rebuilt) != run.pre_restore:
        run.problem(f"the undo image + clone differ from the pre-restore source in extents "
                    f"{sorted(differing_extents(bytes(rebuilt), run.pre_restore, EXT))[:8]}")


def model_after_restart(run: Run, model: BlockModel) -> BlockModel:
    """Phase undo-running: the undo's model if the switch is durable (it
    must be once acknowledged), else the restore's."""
    if run.undo_model is None:
        return model
    kind = (run.daemon.json("status", "src")["restore"] or {}).get("kind")
    run.notes.append(f"after the restart: {kind}")
    if kind == "undo":
        return run.undo_model
    if run.acked:
        run.problem(f"restore undo was acknowledged but after the cut the job is {kind}")
    return model


def check_after_restart(run: Run, phase: Phase, model: BlockModel) -> None:
    daemon = run.daemon
    status = daemon.json("status", "src")
    clones = {c["name"]: c for c in status["clones"]}
    if phase.restore:
        r = status["restore"] or {}
        if phase.writeback_error and r.get("state") == "paused":
            run.notes.append(f"paused after the restart: {r.get('error')}")
            daemon.cli("restore", "resume", "src")
            r = daemon.json("status", "src")["restore"] or {}
        if r.get("state") not in ("running", "done"):
            run.problem(f"the restore did not resume by itself: {r}")
            return
        if r.get("state") == "running":
            daemon.cli("restore", "rate", "src", "0", check=False)  # it may end meanwhile
        wait_for(lambda: (daemon.json("status", "src")["restore"] or {}).get("state")
                 == "done", 60, what="restore done")
        if run.pre_restore is not None and r.get("kind") != "undo":
            check_undo_image(run)
    elif "c1" in clones and clones["c1"]["state"] != "fractured":
        wait_clone_state(daemon, "src", "c1", "synchronized", timeout=60)
    src = whole(daemon, "src")
    bad = model.mismatches(src)
    if bad:
        run.problem(f"source: {len(bad)} blocks hold no value the host may see, "
                    f"first at {bad[:5]}")
    if "c1" not in clones:
        if not run.may_lack_clone:
            run.problem("the clone is gone after the restart")
        check_deleted(run)
        return
    if run.deleted:
        run.problem("clone delete was acknowledged but the clone is listed after the cut")
    if phase.restore and not phase.protected:
        wait_clone_state(daemon, "src", "c1", "synchronized", timeout=60)
        src = whole(daemon, "src")
    clone = whole(daemon, "c1")
    if clone_state(daemon, "src", "c1")["state"] == "fractured":
        if run.phase == "resync" and run.acked:
            run.problem("clone sync was acknowledged but the clone is fractured after the cut")
        if run.clone_data is not None and clone != run.clone_data:
            run.problem(f"the clone changed in extents "
                        f"{sorted(differing_extents(clone, run.clone_data, EXT))[:8]}")
    elif clone != src:
        run.problem(f"synchronized clone differs from the source in extents "
                    f"{sorted(differing_extents(clone, src, EXT))[:8]}")


def check_deleted(run: Run) -> None:
    """The clone is gone (deleted, or its creation cut short): its file
    too, and the name can be used again."""
    if os.path.exists(run.daemon.volume_path("c1")):
        if run.phase == "initial-sync":     # created, not yet recorded: "move it away"
            run.notes.append("c1.img left behind by a clone create the cut interrupted")
            return
        run.problem(f"c1 is no volume after the cut but its file is there "
                    f"({run.phase}, command acknowledged: {run.acked})")
    p = run.daemon.cli("clone", "create", "src", "c1", check=False)
    if p.returncode != 0:
        run.problem(f"clone create c1 after the cut: {p.stderr.strip()}")
    else:
        wait_clone_state(run.daemon, "src", "c1", "synchronized", timeout=60)


def check_persisted_delta(run: Run, state_dir: str) -> None:
    """After a clean stop: the persisted delta map covers every difference."""
    clone_path = os.path.join(state_dir, "volumes", "c1.img")
    if not os.path.exists(clone_path):
        return
    d = read_durable(state_dir)
    if d.clone is None:
        return
    missing = differing_extents(d.src, d.clone, EXT) - d.maps["delta"]
    if missing:
        run.problem(f"after stop: extents {sorted(missing)[:8]} differ without a delta bit")


# ---------------------------------------------------------------- runs

def run_phase(name: str, cuts: int, seed: int, stop_at_first: bool = False,
              verbose: bool = False, out=print) -> tuple[int, list[Run]]:
    """``cuts`` cuts of one phase (half with FUA writes); returns (cuts, runs with problems)."""
    failed = []
    done = 0
    for k in range(cuts):
        s = seed * 10_000 + k
        run = one_cut(PHASES[name], s, fua=k % 2 == 1)
        done += 1
        if verbose:
            out(f"{name} seed {s}: {'; '.join(run.notes)}")
        if run.problems:
            failed.append(run)
            out(f"{name} seed {s}: MISMATCH {run.problems} ({'; '.join(run.notes)})")
            if stop_at_first:
                break
    return done, failed


@pytest.fixture
def lazy_ok():
    why = unavailable()
    if why:
        pytest.skip(f"LazyFS cannot run here: {why}")


@pytest.mark.parametrize("phase", list(PHASES))
def test_power_cut(lazy_ok, long_mode, phase):
    """3 cuts per phase in CI, 45 per phase with --long."""
    cuts = 45 if long_mode else 3
    t0 = time.monotonic()
    done, failed = run_phase(phase, cuts, seed=1 + list(PHASES).index(phase))
    print(f"power cuts {phase}: {done} cuts, {len(failed)} with mismatches, "
          f"{time.monotonic() - t0:.1f} s")
    assert not failed, "\n".join(f"seed {r.seed}: {r.problems}" for r in failed)


def main() -> None:
    p = argparse.ArgumentParser(description="power cuts of one phase")
    p.add_argument("phase", choices=list(PHASES))
    p.add_argument("--cuts", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-v", "--verbose", action="store_true", help="a line per cut")
    a = p.parse_args()
    t0 = time.monotonic()
    done, failed = run_phase(a.phase, a.cuts, a.seed, stop_at_first=True, verbose=a.verbose)
    print(f"{a.phase}: {done} cuts, {len(failed)} with mismatches, "
          f"{time.monotonic() - t0:.1f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
