"""A pause probe: 4 KiB O_DIRECT|O_DSYNC writes to PATH every 20 ms, the
wall-clock time of each completion appended to LOG, until STOPFILE exists.

``probe.py once PATH``: one such write, and how long it took: started
right after the daemon is ready again, it shows when new I/O resumes.
``probe.py report LOG``: the longest gap between the probe's completions:
a request that was inside the daemon when it went away is re-sent by the
kernel only at its 30 s timer (docs/ATTACH.md), so this shows that wait."""
import mmap
import os
import sys
import time


def run(path: str, log: str, stopfile: str) -> None:
    buf = mmap.mmap(-1, 4096)          # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(4096))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_DSYNC, 0o644)
    with open(log, "a", buffering=1) as out:
        n = 0
        while not os.path.exists(stopfile):
            os.pwrite(fd, buf, (n % 256) * 4096)
            out.write(f"{time.time():.3f}\n")
            n += 1
            time.sleep(0.02)


def once(path: str, within: float) -> int:
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_DSYNC, 0o644)
    t0 = time.monotonic()
    os.pwrite(fd, buf, 0)
    took = time.monotonic() - t0
    print(f"a new write took {took:.2f} s")
    return 0 if took <= within else 1


def report(log: str, bound: float) -> int:
    times = [float(line) for line in open(log) if line.strip()]
    longest = max(b - a for a, b in zip(times, times[1:]))
    print(f"{len(times)} writes, longest pause {longest:.2f} s")
    return 0 if longest <= bound else 1


if __name__ == "__main__":
    if sys.argv[1] == "report":
        sys.exit(report(sys.argv[2], float(sys.argv[3])))
    if sys.argv[1] == "once":
        sys.exit(once(sys.argv[2], float(sys.argv[3])))
    run(*sys.argv[1:4])
