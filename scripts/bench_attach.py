"""``scripts/bench attach``: /dev/nbd0 through each attach path, in one boot
of the test VM (tests/vm), alternated for several rounds.

Paths: lunclone's netlink attach with 1 and N connections; what attach did
before (nbd-client onto an nbdkit retry proxy); nbd-client straight onto
the daemon with 1 and N connections.  Cases: fio 4k randrw qd16, 1 MiB
sequential write and read, on the device (O_DIRECT).  The guest runs
under TCG here: compare the paths with each other, not with a host.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.vm import image  # noqa: E402

MARK = "LUNCLONE-BENCH "
# (numerator, denominator, what the issue asks of the ratio)
COMPARISONS = [("netlink-1", "proxy-1", ">= 1.3 on 4k IOPS"),
               ("netlink-N", "nbd-client-N", ">= 1.0"),
               ("netlink-1", "nbd-client-1", ">= 1.0"),
               ("netlink-N", "netlink-1", "the default's choice")]


def results(log: str, connections: int) -> dict[tuple[str, str], dict[int, float]]:
    """{(path, case): {round: IOPS or MiB/s}} from the console log."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for line in open(log, errors="replace"):
        if MARK not in line:
            continue
        rec = json.loads(line[line.index(MARK) + len(MARK):])
        path = rec["path"].replace(f"-{connections}", "-N") if connections > 1 else rec["path"]
        value = rec["iops"] if rec["case"].startswith("4k") else rec["mibs"]
        out.setdefault((path, rec["case"]), {})[rec["round"]] = value
    return out


def print_table(res: dict, connections: int) -> None:
    cases = sorted({c for _, c in res}, key=lambda c: (not c.startswith("4k"), c))
    paths = ["netlink-1", "netlink-N", "proxy-1", "nbd-client-1", "nbd-client-N"]
    print(f"N = {connections} connections; 4k: IOPS, 1M: MiB/s; every round, then the median")
    for case in cases:
        print(f"\n{case}")
        for path in paths:
            vals = res.get((path, case), {})
            rounds = " ".join(f"{vals[r]:8.1f}" for r in sorted(vals))
            med = statistics.median(vals.values()) if vals else float("nan")
            print(f"  {path:14} {rounds}   median {med:8.1f}")
        for num, den, target in COMPARISONS:
            a, b = res.get((num, case), {}), res.get((den, case), {})
            ratios = [a[r] / b[r] for r in sorted(a) if r in b and b[r]]
            if ratios:
                print(f"  {num}/{den}: median of per-round ratios "
                      f"{statistics.median(ratios):.2f}  ({target})")


def bench_attach(args) -> None:
    why = image.qemu_missing()
    if why:
        sys.exit(f"cannot run the VM: {why}")
    img = image.build_image()
    work = os.path.join(image.CACHE, "runs")
    os.makedirs(work, exist_ok=True)
    steps, log = image.boot(
        img, "bench-attach", work, timeout=3600,
        append=f"lunclone.rounds={args.rounds} lunclone.runtime={int(args.runtime)} "
               f"lunclone.connections={args.connections}")
    failed = [s for s in steps if not s.get("ok")]
    if failed:
        sys.exit(f"the guest reported failures: {failed}; console log {log}")
    print_table(results(log, args.connections), args.connections)
    print(f"\nconsole log: {log}")
