"""fio with its NBD engine against an export."""
from __future__ import annotations

import json
import subprocess


def run_fio(uri: str, *, rw: str, bs: str, size: str, iodepth: int = 16,
            runtime: float | None = None, verify: str | None = None,
            numjobs: int = 1, extra: list[str] | None = None, timeout: float = 600) -> dict:
    """Run one fio job; return its parsed JSON (fio prints a banner first)."""
    args = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            f"--bs={bs}", f"--size={size}", f"--iodepth={iodepth}",
            f"--numjobs={numjobs}", "--output-format=json", "--group_reporting"]
    if runtime:
        args += [f"--runtime={runtime}", "--time_based"]
    if verify:
        args += [f"--verify={verify}", "--do_verify=1", "--verify_fatal=1"]
    args += extra or []
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    out = p.stdout
    start = out.find("{")
    if p.returncode != 0 or start < 0:
        raise RuntimeError(f"fio failed ({p.returncode}): {p.stderr[-2000:]} {out[-2000:]}")
    return json.loads(out[start:])


def iops(result: dict) -> float:
    job = result["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"]


def bandwidth(result: dict) -> float:
    job = result["jobs"][0]
    return (job["read"]["bw_bytes"] + job["write"]["bw_bytes"])
