"""lunclone benchmarks: every figure beside a baseline from the same run.

The machine is shared and single runs swing by ~15%, so the sides are
alternated for several rounds and the median of the per-round ratios is
reported.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fio import bandwidth, iops, run_fio  # noqa: E402
from helpers import Daemon, fsync_path  # noqa: E402


def pretouch(size: int) -> None:
    """The VM gives idle memory back to its host: touch it before timing."""
    path = os.path.join("/tmp", f"pretouch.{os.getpid()}")
    subprocess.run(["head", "-c", str(size), "/dev/zero"], stdout=open(path, "wb"), check=True)
    os.unlink(path)


class NbdkitServer:
    """A baseline nbdkit on a Unix socket."""

    def __init__(self, sock: str, *args: str):
        self.sock = sock
        self.proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, *args])
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit {args} did not start")
            time.sleep(0.05)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


FIO_CASES = {
    "4k randread qd16": dict(rw="randread", bs="4k", iodepth=16),
    "4k randwrite qd16": dict(rw="randwrite", bs="4k", iodepth=16),
    "1M read seq": dict(rw="read", bs="1M", iodepth=4),
    "1M write seq": dict(rw="write", bs="1M", iodepth=4),
}


def measure(uri: str, case: dict, size: str, runtime: float) -> float:
    res = run_fio(uri, size=size, runtime=runtime, **case)
    return iops(res) if case["bs"] == "4k" else bandwidth(res) / 1e6


def alternate(sides: dict[str, str], cases: dict, rounds: int, size: str,
              runtime: float, touch: int) -> dict:
    """results[case][side] = list of figures, one per round."""
    results = {c: {s: [] for s in sides} for c in cases}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for case_name, case in cases.items():
            for side in order:
                pretouch(touch)
                results[case_name][side].append(measure(sides[side], case, size, runtime))
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    return results


def report(results: dict, subject: str, baselines: list[str]) -> None:
    sides = [subject] + baselines
    head = f"{'case':20}" + "".join(f"{s:>16}" for s in sides) + "".join(
        f"{'ratio/' + b:>22}" for b in baselines)
    print(head)
    for case, by_side in results.items():
        unit = "IOPS" if case.startswith("4k") else "MB/s"
        med = {s: statistics.median(v) for s, v in by_side.items()}
        cols = "".join(f"{med[s]:>11.0f} {unit:4}" for s in sides)
        ratios = "".join(
            f"{statistics.median(a / b for a, b in zip(by_side[subject], by_side[base])):>22.3f}"
            for base in baselines)
        print(f"{case:20}{cols}{ratios}")


@contextlib.contextmanager
def bench_daemon():
    """A lunclone daemon in a temporary directory (under $LUNCLONE_BENCH_DIR,
    say a reflink filesystem's mount, else /tmp): (daemon, workdir)."""
    work = tempfile.mkdtemp(prefix="lcb", dir=os.environ.get("LUNCLONE_BENCH_DIR", "/tmp"))
    d = Daemon(os.path.join(work, "state"), os.path.join(work, "run")).start()
    try:
        yield d, work
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


def python_passthrough(work: str, path: str, mirror: str | None = None) -> NbdkitServer:
    """The bare Python plugin on ``path``; with ``mirror`` it also writes there."""
    extra = [f"mirror={mirror}"] if mirror else []
    sock = os.path.join(work, "pymirror.sock" if mirror else "py.sock")
    return NbdkitServer(sock, "python", os.path.join(ROOT, "scripts", "passthrough_plugin.py"),
                        f"file={path}", *extra)


def bench_io(args) -> None:
    with bench_daemon() as (d, work):
        d.cli("create", "bench", "--size", args.size)
        path = d.volume_path("bench")
        fill(path, int(args.size.rstrip("G")) * 1024)
        servers = [NbdkitServer(os.path.join(work, "file.sock"), "file", path),
                   python_passthrough(work, path)]
        try:
            sides = {"lunclone": d.uri("bench"), "file(C)": servers[0].uri,
                     "python-pass": servers[1].uri}
            print(f"io: {args.rounds} rounds, {args.runtime}s per run, volume {args.size}")
            res = alternate(sides, FIO_CASES, args.rounds, args.size, args.runtime, 1 << 30)
            report(res, "lunclone", ["python-pass", "file(C)"])
        finally:
            for srv in servers:
                srv.stop()


def fill(path: str, size_mb: int, every: int = 1) -> None:
    """Write random data into every ``every``-th MiB of a volume file."""
    with open(path, "r+b") as f:
        for mb in range(0, size_mb, every):
            f.seek(mb << 20)
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())


def filled_with_clone(d: Daemon, size_mb: int) -> None:
    """Volume ``v`` of ``size_mb`` MiB filled with data, and its clone ``c``
    synchronized: the starting point of the restore benchmarks."""
    d.cli("create", "v", "--size", f"{size_mb}M")
    fill(d.volume_path("v"), size_mb)
    d.cli("clone", "create", "v", "c")
    wait_state(d, "v", "c", "synchronized")


def wait_state(d: Daemon, source: str, clone: str, state: str, timeout: float = 600) -> float:
    """Poll in-process (a CLI call costs ~0.1 s, too coarse for timing)."""
    from lunclone.client import Client
    t0 = time.monotonic()
    with Client(d.run_dir) as c:
        while time.monotonic() - t0 < timeout:
            for cl in c.call("status", name=source)["clones"]:
                if cl["name"] == clone and cl["state"] == state:
                    return time.monotonic() - t0
            time.sleep(0.01)
    raise RuntimeError(f"{clone} not {state}")


def bench_clone(args) -> None:
    """Delta tracking and mirroring cost; initial sync against cp --sparse."""
    with bench_daemon() as (d, work):
        d.cli("create", "bench", "--size", args.size)
        path = d.volume_path("bench")
        fill(path, int(args.size.rstrip("G")) * 1024)
        passthrough = python_passthrough(work, path)
        second = os.path.join(work, "mirror.img")
        subprocess.run(["cp", "--sparse=always", path, second], check=True)
        mirror_peer = python_passthrough(work, path, mirror=second)
        try:
            sides = {"lunclone": d.uri("bench"), "python-pass": passthrough.uri}
            cases = {k: v for k, v in FIO_CASES.items() if k.startswith("4k")}
            d.cli("clone", "create", "bench", "mirror")
            wait_state(d, "bench", "mirror", "synchronized")
            print(f"clone: {args.rounds} rounds, {args.runtime}s per run, volume {args.size}")
            print("-- synchronized clone (every write mirrored, write intent bits):")
            report(alternate({**sides, "python-mirror": mirror_peer.uri}, cases, args.rounds,
                             args.size, args.runtime, 1 << 30),
                   "lunclone", ["python-pass", "python-mirror"])
            d.cli("clone", "fracture", "mirror")
            print("-- fractured clone (delta tracking on):")
            report(alternate(sides, cases, args.rounds, args.size, args.runtime, 1 << 30),
                   "lunclone", ["python-pass"])
            d.cli("clone", "delete", "mirror")
        finally:
            passthrough.stop()
            mirror_peer.stop()
            os.unlink(second)
        bench_initial_sync(d, path, work, args.rounds)


def bench_initial_sync(d: Daemon, path: str, work: str, rounds: int) -> None:
    """Initial sync of a half-allocated volume against cp --sparse=always."""
    d.cli("create", "half", "--size", "2G")
    half = d.volume_path("half")
    fill(half, 2048, every=2)
    sync_s, cp_s = [], []
    for r in range(rounds):
        for side in (("lunclone", "cp") if r % 2 == 0 else ("cp", "lunclone")):
            pretouch(1 << 30)
            if side == "cp":
                dst = os.path.join(work, "cp.img")
                t0 = time.monotonic()
                subprocess.run(["cp", "--sparse=always", half, dst], check=True)
                fd = os.open(dst, os.O_RDONLY)
                os.fdatasync(fd)
                os.close(fd)
                cp_s.append(time.monotonic() - t0)
                os.unlink(dst)
            else:
                from lunclone.client import Client
                t0 = time.monotonic()
                with Client(d.run_dir) as c:
                    c.call("clone_create", source="half", name="hc")
                wait_state(d, "half", "hc", "synchronized")
                sync_s.append(time.monotonic() - t0)
                d.cli("clone", "delete", "hc")
    data = 1 << 30
    ratios = [c / s for s, c in zip(sync_s, cp_s)]
    print(f"-- initial sync of 2 GiB, 1 GiB allocated ({rounds} rounds):")
    print(f"   lunclone clone create -> synchronized: median {statistics.median(sync_s):.2f} s "
          f"({data / statistics.median(sync_s) / 1e6:.0f} MB/s of data)")
    print(f"   cp --sparse=always + fdatasync:        median {statistics.median(cp_s):.2f} s "
          f"({data / statistics.median(cp_s) / 1e6:.0f} MB/s)")
    print(f"   throughput ratio lunclone/cp: median {statistics.median(ratios):.3f}")


def wait_restore_done(d: Daemon, name: str) -> None:
    from lunclone.client import Client
    with Client(d.run_dir) as c:  # 'wait' answers when the job ends
        while c.call("wait", name=name, timeout=10.0)["restore"]["state"] != "done":
            pass


def damage_and_fracture(d: Daemon, src: str, clone: str, offsets: list[int], n: int = 65536):
    """Re-sync and fracture ``clone``, then overwrite ``offsets`` of ``src``."""
    d.cli("clone", "sync", clone)
    wait_state(d, src, clone, "synchronized")
    d.cli("clone", "fracture", clone)
    h = d.connect(src)
    for off in offsets:
        h.pwrite(b"\xee" * n, off)
    h.flush()
    del h


def bench_first_read(args) -> None:
    """Time from `restore` returning to the first correct read, 1 GiB and 1 TiB."""
    from lunclone.client import Client
    print("-- restore start and first read of a restored extent (median of rounds):")
    print(f"{'volume':8}{'restore call':>16}{'first read':>14}{'plain read':>14}{'ratio':>8}")
    for size in ("1G", "1T"):
        with bench_daemon() as (d, work):
            d.cli("create", "v", "--size", size)
            total = d.json("status", "v")["size"]
            offsets = [(total // 64) * k for k in range(64)]
            h = d.connect("v")
            for off in offsets:
                h.pwrite(os.urandom(65536), off)
            h.flush()
            d.cli("clone", "create", "v", "c")
            wait_state(d, "v", "c", "synchronized")
            expect = d.connect("c").pread(4096, offsets[7])
            calls, firsts, plains = [], [], []
            for r in range(args.rounds):
                damage_and_fracture(d, "v", "c", offsets)
                t0 = time.perf_counter()
                h.pread(4096, offsets[9])  # a plain read, no restore
                plains.append(time.perf_counter() - t0)
                with Client(d.run_dir) as c:
                    t0 = time.perf_counter()
                    c.call("restore", source="v", clone_name="c", rate_limit=1 << 20)
                    t1 = time.perf_counter()
                got = h.pread(4096, offsets[7])
                t2 = time.perf_counter()
                assert got == expect, "first read after restore is not the clone's data"
                calls.append(t1 - t0)
                firsts.append(t2 - t1)
                d.cli("restore", "rate", "v", "0")
                wait_restore_done(d, "v")
            m = statistics.median
            print(f"{size:8}{m(calls) * 1e3:>13.1f} ms{m(firsts) * 1e3:>11.2f} ms"
                  f"{m(plains) * 1e3:>11.2f} ms{m(firsts) / m(plains):>8.1f}")
            del h


def raw_copy_loop(src: str, dst: str, extents: int, extent: int) -> float:
    """The baseline: copy_file_range extent by extent, then fdatasync."""
    t = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(t, extents * extent)
    os.close(t)
    took = raw_copy_extents(src, dst, range(extents), extent)
    os.unlink(dst)
    return took


def bench_restore(args) -> None:
    bench_first_read(args)
    with bench_daemon() as (d, work):
        size_mb = 1024
        d.cli("create", "v", "--size", f"{size_mb}M")
        path = d.volume_path("v")
        fill(path, size_mb)
        d.cli("clone", "create", "v", "c")
        wait_state(d, "v", "c", "synchronized")
        every_mb = [mb << 20 for mb in range(size_mb)]
        job_s, raw_s = [], []
        for r in range(args.rounds):
            for side in (("job", "raw") if r % 2 == 0 else ("raw", "job")):
                if side == "raw":
                    pretouch(1 << 30)
                    raw_s.append(raw_copy_loop(d.volume_path("c"), os.path.join(work, "raw.img"),
                                               size_mb * 16, 65536))
                    continue
                damage_and_fracture(d, "v", "c", every_mb, n=1 << 20)
                pretouch(1 << 30)
                from lunclone.client import Client
                t0 = time.monotonic()
                with Client(d.run_dir) as c:
                    c.call("restore", source="v", clone_name="c")
                wait_restore_done(d, "v")
                job_s.append(time.monotonic() - t0)
        m = statistics.median
        print(f"-- background copy of 1 GiB (every extent differs), {args.rounds} rounds:")
        print(f"   restore job: median {m(job_s):.2f} s ({1024 / m(job_s):.0f} MiB/s); raw "
              f"copy_file_range loop: {m(raw_s):.2f} s ({1024 / m(raw_s):.0f} MiB/s); "
              f"ratio {m([b / a for a, b in zip(job_s, raw_s)]):.3f}")
        bench_io_during_restore(d, args, every_mb)


def raw_copy_extents(src: str, dst: str, exts: range | list[int], extent: int) -> float:
    """The baseline of a scattered restore: copy_file_range of exactly the
    changed extents into an allocated file, then fdatasync."""
    s, t = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    t0 = time.monotonic()
    for i in exts:
        off, done = i * extent, 0
        while done < extent:
            done += os.copy_file_range(s, t, extent - done, off + done, off + done)
    os.fdatasync(t)
    took = time.monotonic() - t0
    os.close(s)
    os.close(t)
    return took


def bench_scattered(args) -> None:
    """``restore`` until done of a 2 GiB volume with 1%, 10% and 100% of its
    64 KiB extents changed at random places, beside a raw copy_file_range
    loop over exactly those extents (the disk's speed for that change) and
    qemu-storage-daemon's block-stream of exactly those extents from the
    clone (``bench_qsd``): into a qcow2 overlay whose data file is the raw
    loop's file (written in place), and into a plain qcow2 overlay."""
    import random
    from bench_qsd import make_overlay, timed_block_stream
    from lunclone.client import Client
    size_mb, extent = 2048, 65536
    with bench_daemon() as (d, work):
        filled_with_clone(d, size_mb)
        clone = d.volume_path("c")
        raw_dst = os.path.join(work, "raw.img")
        shutil.copyfile(d.volume_path("v"), raw_dst)
        fsync_path(raw_dst)  # else raw's first fdatasync writes the whole copy
        overlay = os.path.join(work, "stream.qcow2")
        next_ = (size_mb << 20) // extent
        print(f"-- restore of scattered changes, 2 GiB, {args.rounds} alternated rounds; seconds "
              "per round: restore/resync/raw/qsd/qsd-qcow2, ratio = their time / restore's "
              "time.\n   resync: 'clone sync' of the same change source -> clone.\n"
              "   raw: copy_file_range of the changed extents + fdatasync.  qsd: "
              "qemu-storage-daemon block-stream of the same extents from the clone (raw, backing)\n"
              "   into a qcow2 overlay (unchanged clusters: zero clusters, changed: unallocated) "
              "+ fdatasync; qsd: its data file is raw's file,\n   written in place; "
              "qsd-qcow2: a plain qcow2, new clusters appended.")
        sides = ("job", "resync", "raw", "qsd", "qsd-qcow2")
        for pct in (1, 10, 100):
            exts = sorted(random.Random(pct).sample(range(next_), next_ * pct // 100))
            took = {s: [] for s in sides}
            for r in range(args.rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    if side == "raw":
                        pretouch(1 << 30)
                        took[side].append(raw_copy_extents(clone, raw_dst, exts, extent))
                    elif side.startswith("qsd"):
                        in_place = side == "qsd"
                        make_overlay(overlay, clone, size_mb << 20, exts, extent, in_place)
                        pretouch(1 << 30)
                        took[side].append(timed_block_stream(
                            overlay, clone, work, raw_dst if in_place else None))
                    elif side == "resync":  # the same change, source -> clone
                        damage_and_fracture(d, "v", "c", [i * extent for i in exts], n=4096)
                        pretouch(1 << 30)
                        t0 = time.monotonic()
                        with Client(d.run_dir) as c:
                            c.call("clone_sync", name="c")
                            while c.call("wait", name="v", timeout=10.0)["clones"][0][
                                    "state"] != "synchronized":
                                pass
                        took[side].append(time.monotonic() - t0)
                    else:
                        damage_and_fracture(d, "v", "c", [i * extent for i in exts], n=4096)
                        pretouch(1 << 30)
                        t0 = time.monotonic()
                        with Client(d.run_dir) as c:
                            c.call("restore", source="v", clone_name="c")
                        wait_restore_done(d, "v")
                        took[side].append(time.monotonic() - t0)
            rounds = ", ".join("/".join(f"{t:.3f}" for t in ts) for ts in zip(*took.values()))
            ratio = " ".join(
                f"{s} {statistics.median(b / a for a, b in zip(took['job'], took[s])):.3f}"
                for s in sides[1:]) + " (each / restore); raw/resync {:.3f}".format(
                statistics.median(b / a for a, b in zip(took["resync"], took["raw"])))
            print(f"   {pct:3d}% ({len(exts)} extents): {rounds}; median ratio {ratio}",
                  flush=True)
        if os.path.exists(overlay):
            os.unlink(overlay)


def bench_io_during_restore(d: Daemon, args, every_mb: list[int]) -> None:
    case = dict(rw="randrw", bs="4k", iodepth=16)
    during, idle, took = [], [], []
    for r in range(args.rounds):
        for side in (("restore", "idle") if r % 2 == 0 else ("idle", "restore")):
            if side == "restore":
                damage_and_fracture(d, "v", "c", every_mb, n=1 << 20)
            pretouch(1 << 30)
            if side == "idle":
                idle.append(measure(d.uri("v"), case, "1G", args.runtime))
                continue
            d.cli("restore", "v", "--from", "c")
            t0 = time.monotonic()
            during.append(measure(d.uri("v"), case, "1G", args.runtime))
            wait_restore_done(d, "v")
            took.append(time.monotonic() - t0)
    m = statistics.median
    print(f"-- fio 4k randrw qd16 for {args.runtime:.0f}s, {args.rounds} rounds:")
    print(f"   during a restore of 1 GiB: {m(during):.0f} IOPS; no restore: {m(idle):.0f} IOPS; "
          f"ratio {m([a / b for a, b in zip(during, idle)]):.3f}; "
          f"restore took {m(took):.1f} s meanwhile")


DURING_CASES = {
    "4k randrw qd16": dict(rw="randrw", bs="4k", iodepth=16),
    "1M rw seq qd4": dict(rw="rw", bs="1M", iodepth=4),
}


def restore_alone(d: Daemon, flags: list[str], every_mb: list[int]) -> float:
    """Seconds from ``restore`` to its end with no host I/O."""
    damage_and_fracture(d, "v", "c", every_mb, n=1 << 20)
    pretouch(1 << 30)
    t0 = time.monotonic()
    d.cli("restore", "v", "--from", "c", *flags)
    wait_restore_done(d, "v")
    return time.monotonic() - t0


DURING_MB = 4096  # alone, its restore outlasts a few seconds of fio


def timed(d: Daemon, command: str, **args) -> float:
    """Seconds from a restore's start (control ``command``: ``restore`` or
    ``restore_undo``) to its end (``--wait``'s span)."""
    from lunclone.client import Client
    t0 = time.monotonic()
    with Client(d.run_dir) as c:
        c.call(command, source="v", **args)
    wait_restore_done(d, "v")
    return time.monotonic() - t0


def bench_undo(args) -> None:
    """Issue 17, item 6: a restore until done of a 1 GiB volume with 10% and
    100% of its 64 KiB extents changed, with ``--undo`` (the old data of
    each extent copied into the undo image first, so the data is copied
    twice) and without, beside a raw copy_file_range loop of the same
    extents, and ``restore undo`` of the ``--undo`` one right after it
    ("back": the same extents, from the undo image and the clone); then
    host 4k randrw IOPS during a restore of every
    extent with ``--undo`` beside one without.  The sides alternate; the
    last round's undo point is dropped before the next (``--force``)."""
    import random
    size_mb, extent = 1024, 65536
    with bench_daemon() as (d, work):
        filled_with_clone(d, size_mb)
        raw_dst = os.path.join(work, "raw.img")
        shutil.copyfile(d.volume_path("v"), raw_dst)
        fsync_path(raw_dst)
        nexts = (size_mb << 20) // extent
        m = statistics.median
        print(f"-- restore until done of {size_mb >> 10} GiB, with --undo / without / raw "
              f"copy_file_range of the same extents, {args.rounds} alternated rounds (seconds):")
        for pct in ((10, 100) if args.part in ("all", "restore") else ()):
            exts = sorted(random.Random(pct).sample(range(nexts), nexts * pct // 100))
            took: dict[str, list[float]] = {"undo": [], "plain": [], "raw": [], "back": []}
            for r in range(args.rounds):
                for side in (("undo", "plain", "raw") if r % 2 == 0 else ("raw", "plain", "undo")):
                    if side == "raw":
                        pretouch(1 << 30)
                        took[side].append(raw_copy_extents(d.volume_path("c"), raw_dst, exts,
                                                           extent))
                        continue
                    d.cli("restore", "forget", "v", check=False)
                    damage_and_fracture(d, "v", "c", [i * extent for i in exts], n=4096)
                    pretouch(1 << 30)
                    took[side].append(timed(d, "restore", clone_name="c", keep_undo=side == "undo",
                                            force=True))
                    if side == "undo":  # and back: the same extents, from the undo image
                        pretouch(1 << 30)
                        took["back"].append(timed(d, "restore_undo"))
            rounds = ", ".join("/".join(f"{t:.2f}" for t in ts) for ts in zip(*took.values()))
            ratio = m(p / u for u, p in zip(took["undo"], took["plain"]))
            raw = m(w / u for u, w in zip(took["undo"], took["raw"]))
            back = m(p / b for b, p in zip(took["back"], took["plain"]))
            print(f"   {pct:3d}% ({len(exts)} extents, {len(exts) * extent >> 20} MiB) "
                  f"undo/plain/raw/back: {rounds}; median throughput with undo / without "
                  f"{ratio:.3f} (target >= 0.45); raw time / undo time {raw:.3f}; "
                  f"restore undo / plain restore throughput {back:.3f}", flush=True)
        case = dict(rw="randrw", bs="4k", iodepth=16)
        iops_: dict[str, list[float]] = {"undo": [], "plain": []}
        every_mb = [mb << 20 for mb in range(size_mb)]
        for r in range(args.rounds if args.part in ("all", "iops") else 0):
            for side in (iops_ if r % 2 == 0 else list(iops_)[::-1]):
                d.cli("restore", "forget", "v", check=False)
                damage_and_fracture(d, "v", "c", every_mb, n=1 << 20)
                pretouch(1 << 30)
                # rate-limited so that it runs under the whole fio run on both sides
                d.cli("restore", "v", "--from", "c", "--force", "--rate", "128M",
                      *(["--undo"] if side == "undo" else []))
                iops_[side].append(measure(d.uri("v"), case, f"{size_mb}M", args.runtime))
                end_restore(d, "v")
        if not iops_["undo"]:
            return
        rounds = ", ".join(f"{u:.0f}/{p:.0f}" for u, p in zip(iops_["undo"], iops_["plain"]))
        print(f"-- fio 4k randrw qd16 for {args.runtime:.0f}s during a restore of every extent "
              "at 128 MiB/s (pending extents under the I/O), "
              f"with --undo / without: {rounds} IOPS; median ratio "
              f"{m(u / p for u, p in zip(iops_['undo'], iops_['plain'])):.3f} (target >= 1)")


def bench_during(args) -> None:
    """Host I/O over a whole 4 GiB volume during an unthrottled restore of
    it (every extent differs), beside the same fio on the same volume with
    no restore (its clone fractured, as after any restore), for protected
    and ``--unprotected`` restores; and the restore's duration under that
    load beside its duration alone.  The sides alternate."""
    with bench_daemon() as (d, work):
        filled_with_clone(d, DURING_MB)
        every_mb = [mb << 20 for mb in range(DURING_MB)]
        size = f"{DURING_MB}M"
        print(f"-- host I/O during an unthrottled restore of {DURING_MB >> 10} GiB (every "
              f"extent differs) vs no restore, fio {args.runtime:.0f}s per run, "
              f"{args.rounds} alternated rounds:")
        for mode, flags in (("protected", []), ("unprotected", ["--unprotected"])):
            alone: list[float] = []
            res = {c: {"during": [], "idle": [], "took": []} for c in DURING_CASES}
            for r in range(args.rounds):
                alone.append(restore_alone(d, flags, every_mb))
                for case_name, case in DURING_CASES.items():
                    for side in (("during", "idle") if r % 2 == 0 else ("idle", "during")):
                        damage_and_fracture(d, "v", "c", every_mb if side == "during" else [],
                                            n=1 << 20)
                        pretouch(1 << 30)
                        if side == "during":
                            t0 = time.monotonic()
                            d.cli("restore", "v", "--from", "c", *flags)
                        res[case_name][side].append(measure(d.uri("v"), case, size,
                                                            args.runtime))
                        if side == "during":
                            wait_restore_done(d, "v")
                            res[case_name]["took"].append(time.monotonic() - t0)
                print(f"  {mode} round {r + 1}/{args.rounds} done", file=sys.stderr)
            m = statistics.median
            print(f"   {mode} restore alone: {m(alone):.2f} s "
                  f"({', '.join(f'{a:.2f}' for a in alone)})")
            for case_name, by in res.items():
                unit = "IOPS" if case_name.startswith("4k") else "MB/s"
                rounds = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(by["during"], by["idle"]))
                ratio = m(a / b for a, b in zip(by["during"], by["idle"]))
                print(f"   {mode:11} {case_name:15} during/idle {unit}: {rounds}; median ratio "
                      f"{ratio:.3f}; restore took {m(by['took']):.2f} s under it", flush=True)


# case -> (fio job, the restore's rate limit on the "pending" side)
PENDING_CASES = {
    "4k randread qd16": (dict(rw="randread", bs="4k", iodepth=16), "1M"),
    "4k randwrite qd16": (dict(rw="randwrite", bs="4k", iodepth=16), "1M"),
    "4k randrw qd16, restore at 256M/s": (dict(rw="randrw", bs="4k", iodepth=16), "256M"),
}


def end_restore(d: Daemon, name: str) -> None:
    """Lift the rate limit of a restore still running and wait for its end."""
    if d.json("status", name)["restore"]["state"] != "done":
        d.cli("restore", "rate", name, "0", check=False)  # it may end meanwhile
    wait_restore_done(d, name)


def bench_pending(args) -> None:
    """Host I/O on extents not yet copied, as an admin meets it: the restore
    is rate-limited (1 MiB/s), so nearly every request finds its extent
    pending; and a restore at 256 MiB/s under random I/O.  Beside each, the
    same fio on the same volume once the restore is done; the sides
    alternate."""
    with bench_daemon() as (d, work):
        size_mb = int(args.size.rstrip("MG")) * (1024 if args.size.endswith("G") else 1)
        filled_with_clone(d, size_mb)
        every_mb = [mb << 20 for mb in range(size_mb)]
        results = {c: {"pending": [], "restored": []} for c in PENDING_CASES}
        for r in range(args.rounds):
            for case_name, (case, rate) in PENDING_CASES.items():
                for side in (("pending", "restored") if r % 2 == 0 else ("restored", "pending")):
                    damage_and_fracture(d, "v", "c", every_mb, n=1 << 20)
                    d.cli("restore", "v", "--from", "c", "--rate", rate)
                    if side == "restored":
                        end_restore(d, "v")
                    pretouch(1 << 30)
                    results[case_name][side].append(
                        measure(d.uri("v"), case, args.size, args.runtime))
                    end_restore(d, "v")
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
        print(f"-- host I/O on pending extents (restore at 1 MiB/s unless said) vs the same "
              f"volume restored, {args.size}, {args.runtime:.0f}s per run; every round:")
        for case, by_side in results.items():
            rounds = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in
                               zip(by_side["pending"], by_side["restored"]))
            ratio = statistics.median(a / b for a, b in zip(by_side["pending"],
                                                            by_side["restored"]))
            print(f"   {case:34} pending/restored IOPS: {rounds}; median ratio {ratio:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("suite", choices=["io", "clone", "restore", "scattered", "pending", "during",
                                      "remote", "scale", "attach", "undo"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--size", default="1G")
    p.add_argument("--size-mb", type=int, default=512, help="remote: the volume's size")
    p.add_argument("--connections", type=int, default=2, help="attach: N of the N-connection paths")
    p.add_argument("--part", choices=["all", "restore", "iops"], default="all",
                   help="undo: only the restore times, or only the host IOPS")
    args = p.parse_args()
    from bench_attach import bench_attach
    from bench_remote import bench_remote
    from bench_scale import bench_scale
    {"io": bench_io, "clone": bench_clone, "restore": bench_restore, "scattered": bench_scattered,
     "pending": bench_pending, "during": bench_during, "remote": bench_remote,
     "scale": bench_scale, "attach": bench_attach, "undo": bench_undo}[args.suite](args)


if __name__ == "__main__":
    main()
