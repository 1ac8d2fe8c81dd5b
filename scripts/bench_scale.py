"""Scale: many large volumes with clones and delta maps (issue 15, item 6).

    scripts/bench scale                      # the targets' state directory
    .venv/bin/python scripts/bench_scale.py [--volumes N] [--clones K] [--vol-size 1T]
        [--percent 1] [--run 1M] [--state DIR] [--keep] [--build-only] [--rounds N]
        [--skip-big] [--only-big]

A state directory of ``--volumes`` sources of ``--vol-size`` (sparse
files), each with ``--clones`` local clones, created, synchronized and
fractured through the real daemon (control protocol), then ``--percent``
of each source's extents changed through NBD: trims of ``--run`` bytes
at random ``--run``-aligned places, without overlap.  A trim on a source
with fractured clones sets the delta bit of every clone through the real
path (committed before the trim is done), and costs no disk space.  The
layout decides how many 4 KiB map pages hold a set bit: ``--run 1M``
(the default) puts a bit in nearly every page of every map, so every
page is stored and resident; larger runs cluster them.

Then the daemon is restarted and, each beside its target:
  - start-up: ``lunclone serve`` started to the control socket answering
    a ping, and to the first NBD read of a volume (median of rounds);
  - resident memory of the nbdkit process (VmRSS), after start-up and after
    a ``status`` of every volume; also VmHWM;
  - ``status`` of every volume through the control protocol (median of
    several calls), and ``lunclone status --json`` (the CLI's whole run);
  - restore start: the ``restore`` control call (rate-limited, so little
    is copied meanwhile), then the first read of a pending extent;
  - resident memory once a client has opened every source (start-up
    leaves fractured clones' delta maps unloaded; a family's first
    connection loads them), and the time of such a first connection.

And a 16 TiB volume (16 TiB - 64 KiB: ext4's largest file) with a
fractured clone and 64 extents changed, beside a 1 GiB one with the same:
start-up, restore start and ``status --map`` during it, each in its own
state directory.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import LUNCLONE, Daemon  # noqa: E402

TiB, GiB, MiB, KiB = 1 << 40, 1 << 30, 1 << 20, 1 << 10
EXTENT = 64 * KiB
BIG = 16 * TiB - EXTENT  # ext4 refuses a file of 16 TiB exactly
TARGETS = {"start": 2.0, "rss": 256 * MiB, "status": 0.100, "restore": 0.050}
m = statistics.median


def parse_size(s: str) -> int:
    sys.path.insert(0, os.path.join(ROOT, "daemon"))
    from lunclone.units import parse_size as ps
    return ps(s)


def client(d: Daemon):
    from lunclone.client import Client
    return Client(d.run_dir)


def vmrss(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * KiB
    return out


def ping(sock_path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock_path)
        s.sendall(b'{"cmd":"ping"}\n')
        return b'"ok"' in s.recv(4096)
    except OSError:
        return False
    finally:
        s.close()


def timed_start(d: Daemon, first_volume: str | None, timeout: float = 300) -> tuple[float, float]:
    """Start the daemon: (seconds to the control socket answering, seconds
    to the first NBD read of ``first_volume``).  ``lunclone serve`` execs
    nbdkit, so ``d.proc.pid`` is the daemon's pid."""
    import nbd
    ctl = os.path.join(d.run_dir, "control.sock")
    log = open(d.log_path, "ab")
    t0 = time.perf_counter()
    d.proc = subprocess.Popen([LUNCLONE, "serve", "--state-dir", d.state_dir,
                               "--run-dir", d.run_dir], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    while not ping(ctl):
        if d.proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {d.log()}")
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError("daemon did not come up")
        time.sleep(0.002)
    t_ctl = time.perf_counter() - t0
    t_read = float("nan")
    if first_volume:
        h = nbd.NBD()
        h.connect_uri(d.uri(first_volume))
        h.pread(4096, 0)
        t_read = time.perf_counter() - t0
        del h
    return t_ctl, t_read


def wait_synchronized(d: Daemon, source: str, clones: list[str], timeout: float = 120) -> None:
    t0 = time.monotonic()
    with client(d) as c:
        while time.monotonic() - t0 < timeout:
            st = {cl["name"]: cl["state"] for cl in c.call("status", name=source)["clones"]}
            if all(st.get(n) == "synchronized" for n in clones):
                return
            time.sleep(0.02)
    raise RuntimeError(f"clones of {source} not synchronized")


def change_runs(d: Daemon, name: str, size: int, percent: float, run: int, seed: int) -> int:
    """Trim ``percent`` of ``name``'s extents as runs of ``run`` bytes at
    random aligned places (no overlap), many requests in flight.  Returns
    the number of runs."""
    import nbd
    slots = size // run
    n = max(1, round(size // EXTENT * percent / 100 / (run // EXTENT)))
    places = random.Random(seed).sample(range(slots), n)
    h = nbd.NBD()
    h.connect_uri(d.uri(name))
    inflight = 0
    for s in places:
        while inflight >= 64:
            h.poll(-1)
            inflight = h.aio_in_flight()
        h.aio_trim(run, s * run)
        inflight += 1
    while h.aio_in_flight():
        h.poll(-1)
    h.flush()
    del h
    return n


def build(d: Daemon, volumes: int, clones: int, vol_size: int, percent: float,
          run: int, limit: int = 0) -> bool:
    """Build the sources not built yet (at most ``limit`` of them, if
    given): True once all are."""
    t0 = time.monotonic()
    with client(d) as c:
        have = {v["name"]: v for v in c.call("list")}
    done = 0
    for v in range(volumes):
        if limit and done >= limit:
            return False
        if f"v{v:02d}" in have:
            if len(have[f"v{v:02d}"]["clones"]) != clones:
                raise RuntimeError(f"v{v:02d} is half built: remove the work directory")
            continue
        done += 1
        src = f"v{v:02d}"
        names = [f"{src}-c{k}" for k in range(clones)]
        with client(d) as c:
            c.call("create", name=src, size=vol_size)
            for n in names:
                c.call("clone_create", source=src, name=n)
        wait_synchronized(d, src, names)
        with client(d) as c:
            for n in names:
                c.call("clone_fracture", name=n)
        change_runs(d, src, vol_size, percent, run, seed=v)
        print(f"  built {src} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    return True


def put_db(src: str, dst: str) -> None:
    """Copy the database (its files) from directory ``src`` to ``dst``, the
    daemon stopped: a reused state directory starts from its database as
    built (the restores measured change only holes into holes)."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(dst):
        if f.startswith("lunclone.db"):
            os.unlink(os.path.join(dst, f))
    for f in os.listdir(src):
        if f.startswith("lunclone.db"):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def db_summary(state_dir: str) -> str:
    import sqlite3
    db = sqlite3.connect(f"file:{os.path.join(state_dir, 'lunclone.db')}?mode=ro", uri=True)
    try:
        pages = db.execute("SELECT count(*) FROM bitmaps").fetchone()[0]
        maps = db.execute("SELECT count(DISTINCT owner || '/' || kind) FROM bitmaps").fetchone()[0]
    finally:
        db.close()
    size = sum(os.path.getsize(os.path.join(state_dir, f)) for f in os.listdir(state_dir)
               if f.startswith("lunclone.db"))
    return f"{maps} maps with bits, {pages} stored 4 KiB pages, database {size / MiB:.0f} MiB"


def line(what: str, got: float, target: float, unit: str) -> None:
    scale = {"ms": 1e3, "s": 1.0, "MiB": 1 / MiB}[unit]
    ok = "met" if got < target else "MISSED"
    print(f"   {what:52} {got * scale:10.1f} {unit:3}  target < {target * scale:g} {unit}  {ok}",
          flush=True)


def measure_state(d: Daemon, args, sources: list[str]) -> None:
    """Restart rounds (start-up), memory, status; then restore starts."""
    starts, reads = [], []
    for r in range(args.rounds):
        d.stop()
        t_ctl, t_read = timed_start(d, sources[0])
        starts.append(t_ctl)
        reads.append(t_read)
    rss0 = vmrss(d.proc.pid)
    with client(d) as c:
        calls = []
        for _ in range(max(5, args.rounds)):
            t0 = time.perf_counter()
            everything = c.call("status")
            calls.append(time.perf_counter() - t0)
    rss1 = vmrss(d.proc.pid)
    clis = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([LUNCLONE, "status", "--json", "--run-dir", d.run_dir],
                       stdout=subprocess.DEVNULL, check=True)
        clis.append(time.perf_counter() - t0)
    delta = [cl["delta_extents"] for v in everything for cl in v["clones"]]
    print(f"   ({len(everything)} volumes in status; delta maps: {len(delta)}, "
          f"{m(delta) if delta else 0} extents set in the median one)")
    line(f"start-up to control socket answering (median of {args.rounds})", m(starts),
         TARGETS["start"], "s")
    print(f"     rounds: {', '.join(f'{s:.3f}' for s in starts)} s; to the first NBD read: "
          f"{m(reads):.3f} s")
    line("resident memory after start-up (VmRSS)", rss0["VmRSS"], TARGETS["rss"], "MiB")
    line("resident memory after status (VmRSS)", rss1["VmRSS"], TARGETS["rss"], "MiB")
    print(f"     VmHWM {rss1['VmHWM'] / MiB:.0f} MiB, RssAnon {rss1['RssAnon'] / MiB:.0f} MiB, "
          f"RssFile {rss1['RssFile'] / MiB:.0f} MiB")
    line(f"status of every volume, control protocol (median of {len(calls)})", m(calls),
         TARGETS["status"], "ms")
    print(f"     lunclone status --json, the CLI's whole run (median of 3): "
          f"{m(clis) * 1e3:.0f} ms")
    restore_starts(d, args, sources[:args.rounds], "")
    every_family_opened(d, sources)


def every_family_opened(d: Daemon, sources: list[str]) -> None:
    """A client connects to every source: each family's delta maps are
    loaded on its first connection (start-up left them unloaded), so the
    memory follows the families in use; this is the most it takes."""
    import nbd
    t0 = time.perf_counter()
    for src in sources:
        h = nbd.NBD()
        h.connect_uri(d.uri(src))
        h.pread(4096, 0)
        del h
    took = time.perf_counter() - t0
    rss = vmrss(d.proc.pid)
    print(f"   after a client opened each of the {len(sources)} sources (every map loaded): "
          f"VmRSS {rss['VmRSS'] / MiB:.0f} MiB, {took / len(sources) * 1e3:.0f} ms per "
          "first connection", flush=True)


def restore_starts(d: Daemon, args, sources: list[str], label: str,
                   clone_of=lambda s: f"{s}-c0") -> tuple[float, float]:
    """Restore each of ``sources`` from its first clone, held at 1 MiB/s:
    (median restore call, median first read of a pending extent)."""
    import nbd
    calls, firsts = [], []
    for src in sources:
        off = first_pending(d, src, clone_of(src))
        h = nbd.NBD()
        h.connect_uri(d.uri(src))
        h.pread(4096, 0)
        with client(d) as c:
            t0 = time.perf_counter()
            c.call("restore", source=src, clone_name=clone_of(src), rate_limit=1 << 20)
            t1 = time.perf_counter()
        h.pread(4096, off)
        t2 = time.perf_counter()
        calls.append(t1 - t0)
        firsts.append(t2 - t1)
        del h
    line(f"restore start{label}: the restore call (median of {len(calls)})", m(calls),
         TARGETS["restore"], "ms")
    print(f"     rounds: {', '.join(f'{c * 1e3:.1f}' for c in calls)} ms; then the first read "
          f"of a pending extent: {m(firsts) * 1e3:.2f} ms")
    return m(calls), m(firsts)


def first_pending(d: Daemon, source: str, clone: str) -> int:
    """The offset of the first extent set in ``clone``'s delta map (from the
    database, read-only)."""
    from helpers import read_bitmap
    bits = read_bitmap(d.state_dir, clone, "delta")
    return min(bits) * EXTENT if bits else 0


def big_case(args, work: str) -> None:
    """16 TiB beside 1 GiB: start-up and restore start, 64 extents changed."""
    print(f"-- a {BIG / TiB:.4f} TiB volume (16 TiB - 64 KiB) with a fractured clone, beside a "
          "1 GiB one, 64 extents changed in each, each alone in its state directory:")
    res = {}
    for label, size in (("1 GiB", GiB), ("16 TiB", BIG)):
        base = tempfile.mkdtemp(prefix="lcsb", dir=work)
        d = Daemon(os.path.join(base, "state"), os.path.join(base, "run")).start()
        try:
            with client(d) as c:
                c.call("create", name="v", size=size)
                c.call("clone_create", source="v", name="c")
            wait_synchronized(d, "v", ["c"])
            with client(d) as c:
                c.call("clone_fracture", name="c")
            import nbd
            h = nbd.NBD()
            h.connect_uri(d.uri("v"))
            for k in range(64):
                h.pwrite(b"\xee" * 4096, (size // 64) * k // EXTENT * EXTENT)
            h.flush()
            del h
            starts = []
            for _ in range(args.rounds):
                d.stop()
                starts.append(timed_start(d, "v")[0])
            rss = vmrss(d.proc.pid)["VmRSS"]
            calls = []
            for r in range(args.rounds):
                if r:
                    redo(d)
                with client(d) as c:
                    t0 = time.perf_counter()
                    c.call("restore", source="v", clone_name="c", rate_limit=1 << 20)
                    calls.append(time.perf_counter() - t0)
            maps = map_calls(d, args.rounds)
            res[label] = (m(starts), m(calls))
            print(f"   {label:7} start-up {m(starts) * 1e3:7.1f} ms (rounds "
                  f"{', '.join(f'{s * 1e3:.0f}' for s in starts)}), VmRSS {rss / MiB:.0f} MiB; "
                  f"restore call {m(calls) * 1e3:6.1f} ms (rounds "
                  f"{', '.join(f'{c * 1e3:.1f}' for c in calls)}); status --map "
                  f"{m(maps) * 1e3:.1f} ms (target < 100 ms)", flush=True)
        finally:
            d.stop()
            shutil.rmtree(base, ignore_errors=True)
    (s1, r1), (s16, r16) = res["1 GiB"], res["16 TiB"]
    print(f"   16 TiB / 1 GiB: start-up {s16 / s1:.2f}x, restore start {r16 / r1:.2f}x "
          f"(target: as fast, ~1x)")


def map_calls(d: Daemon, rounds: int) -> list[float]:
    """The ``map`` call ``status v --map`` makes in an 80 x 24 terminal,
    during the restore started last (three maps drawn as 1580 cells)."""
    sys.path.insert(0, os.path.join(ROOT, "daemon"))
    from lunclone.display import map_cells
    _, cells = map_cells(80, 24)
    out = []
    with client(d) as c:
        for _ in range(max(3, rounds)):
            t0 = time.perf_counter()
            c.call("map", name="v", cells=cells)
            out.append(time.perf_counter() - t0)
    return out


def redo(d: Daemon) -> None:
    """End the restore of v, re-sync and fracture c, change the 64 extents again."""
    import nbd
    from bench import wait_restore_done
    with client(d) as c:
        c.call("restore_rate", source="v", limit=0)
    wait_restore_done(d, "v")
    with client(d) as c:
        c.call("clone_sync", name="c")
    wait_synchronized(d, "v", ["c"])
    with client(d) as c:
        c.call("clone_fracture", name="c")
        size = c.call("status", name="v")["size"]
    h = nbd.NBD()
    h.connect_uri(d.uri("v"))
    for k in range(64):
        h.pwrite(b"\xdd" * 4096, (size // 64) * k // EXTENT * EXTENT)
    h.flush()
    del h


def bench_scale(args) -> None:
    volumes = getattr(args, "volumes", 64)
    clones = getattr(args, "clones", 8)
    vol_size = parse_size(getattr(args, "vol_size", "1T"))
    percent = getattr(args, "percent", 1.0)
    run = parse_size(getattr(args, "run", "1M"))
    state = getattr(args, "state", None)
    keep = getattr(args, "keep", False)
    work = os.path.dirname(state) if state else tempfile.mkdtemp(prefix="lcscale", dir="/tmp")
    if not getattr(args, "only_big", False):
        d = Daemon(os.path.join(work, "state"), os.path.join(work, "run"))
        sources = [f"v{v:02d}" for v in range(volumes)]
        layout = (f"{percent:g}% of the extents of each source as trims of {run // KiB} KiB runs "
                  f"at random {run // KiB} KiB-aligned places")
        print(f"-- scale: {volumes} volumes of {vol_size / TiB:g} TiB, {clones} fractured clones "
              f"each, extent 64 KiB; layout: {layout}")
        try:
            snap = os.path.join(work, "db-as-built")
            if os.path.isdir(snap):
                print(f"   (state directory {work}/state reused, its database as built)")
                put_db(snap, d.state_dir)
            else:
                d.start()
                t0 = time.monotonic()
                complete = build(d, volumes, clones, vol_size, percent, run,
                                 getattr(args, "build_limit", 0))
                print(f"   built in {time.monotonic() - t0:.0f} s")
                d.stop()
                if not complete:
                    print("   not all built yet (--build-limit): run again")
                    return
                put_db(d.state_dir, snap)
            print(f"   {db_summary(d.state_dir)}")
            if getattr(args, "build_only", False):
                return
            d.start(timeout=300)
            measure_state(d, args, sources)
        finally:
            d.stop()
    if not getattr(args, "skip_big", False):
        big_case(args, work)
    if not keep and not state:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=64)
    p.add_argument("--clones", type=int, default=8)
    p.add_argument("--vol-size", default="1T")
    p.add_argument("--percent", type=float, default=1.0)
    p.add_argument("--run", default="1M", help="bytes per changed run (a multiple of 64K)")
    p.add_argument("--state", help="work directory: its state/ is built once and reused")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--build-limit", type=int, default=0,
                   help="build at most this many sources in this run (go on in the next)")
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--only-big", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.state:
        os.makedirs(args.state, exist_ok=True)
        args.state = os.path.join(os.path.abspath(args.state), "state")
    bench_scale(args)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    main()
