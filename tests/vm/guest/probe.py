"""A pause probe: 4 KiB O_DIRECT|O_DSYNC writes to PATH every 20 ms, the
wall-clock time of each completion appended to LOG, until STOPFILE exists.

``probe.py read DEV READYFILE WITHIN``: started before the daemon goes
away, it waits for READYFILE (the wall-clock time the daemon answered
again), then does one 4 KiB O_DIRECT read of the device and says how long
after that time it completed: new I/O resumes when the supervisor has
reconnected.  Started beforehand so that no Python start-up under TCG
counts against the daemon.  (A
filesystem can stay stalled longer: a journal flush lost inside the daemon
waits for the kernel's timer, which ``report`` shows.)
``probe.py report LOG``: the longest gap between the probe's completions:
a request that was inside the daemon when it went away is re-sent by the
kernel only at its 30 s timer (docs/ATTACH.md), so this shows that wait."""
import mmap
import os
import random
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


def read(dev: str, readyfile: str, within: float) -> int:
    buf = mmap.mmap(-1, 4096)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    while not os.path.exists(readyfile):
        time.sleep(0.005)
    ready = float(open(readyfile).read())
    os.preadv(fd, [buf], 4096 * random.randrange(1024))
    took = time.time() - ready
    print(f"a new read completed {took:.2f} s after the daemon was ready")
    return 0 if took <= within else 1


def report(log: str, bound: float) -> int:
    times = [float(line) for line in open(log) if line.strip()]
    longest = max(b - a for a, b in zip(times, times[1:]))
    print(f"{len(times)} writes, longest pause {longest:.2f} s")
    return 0 if longest <= bound else 1


if __name__ == "__main__":
    if sys.argv[1] == "report":
        sys.exit(report(sys.argv[2], float(sys.argv[3])))
    if sys.argv[1] == "read":
        sys.exit(read(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    run(*sys.argv[1:4])
