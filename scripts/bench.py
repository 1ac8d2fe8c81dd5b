"""lunclone benchmarks: every figure beside a baseline from the same run.

The machine is shared and single runs swing by ~15%, so the sides are
alternated for several rounds and the median of the per-round ratios is
reported.
"""
from __future__ import annotations

import argparse
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
from helpers import Daemon  # noqa: E402


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


def bench_io(args) -> None:
    work = tempfile.mkdtemp(prefix="lcb", dir="/tmp")
    d = Daemon(os.path.join(work, "state"), os.path.join(work, "run")).start()
    servers = []
    try:
        d.cli("create", "bench", "--size", args.size)
        path = d.volume_path("bench")
        subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M",
                        f"count={int(args.size.rstrip('G')) * 1024}", "conv=notrunc,fsync"],
                       check=True, capture_output=True)
        servers.append(NbdkitServer(os.path.join(work, "file.sock"), "file", path))
        servers.append(NbdkitServer(os.path.join(work, "py.sock"), "python",
                                    os.path.join(ROOT, "scripts", "passthrough_plugin.py"),
                                    f"file={path}"))
        sides = {"lunclone": d.uri("bench"), "file(C)": servers[0].uri,
                 "python-pass": servers[1].uri}
        print(f"io: {args.rounds} rounds, {args.runtime}s per run, volume {args.size}")
        res = alternate(sides, FIO_CASES, args.rounds, args.size, args.runtime, 1 << 30)
        report(res, "lunclone", ["python-pass", "file(C)"])
    finally:
        for s in servers:
            s.stop()
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("suite", choices=["io"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--size", default="1G")
    args = p.parse_args()
    {"io": bench_io}[args.suite](args)


if __name__ == "__main__":
    main()
