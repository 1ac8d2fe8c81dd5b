"""The power-cut writer and its check (tests/vm/test_vm.py, power cuts).

``cutwriter.py write DEV OFFSET BLOCKS``: 4 KiB O_DIRECT|O_DSYNC writes at
random blocks of [OFFSET, OFFSET + BLOCKS * 4 KiB) of DEV, forever.  Before
each write one line ``LUNCLONE-INTENT seq block sha`` goes to the serial
console, after it is acknowledged ``LUNCLONE-ACK seq block sha``: the host
keeps what the console got when it kills the VM.

``cutwriter.py dump URI OFFSET BLOCKS TAG``: ``LUNCLONE-BLOCK TAG block
sha`` for every block, read back through the daemon after the next boot.

``cutwriter.py covers SOURCE-URI CLONE-URI DIFF-JSON``: every byte where
the two exports differ is inside a range of ``clone diff --json``.
"""
import hashlib
import mmap
import os
import random
import sys

BLOCK = 4096


def console():
    return open("/dev/ttyS0", "w", buffering=1)


def write(dev: str, offset: int, blocks: int, sync: bool = True) -> None:
    """``sync`` False: no O_DSYNC, so no flush reaches the daemon (the
    negative control: its acknowledged writes may die in a page cache)."""
    out = console()
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | (os.O_DSYNC if sync else 0))
    buf = mmap.mmap(-1, BLOCK)               # page-aligned, as O_DIRECT needs
    seq = 0
    while True:
        seq += 1
        block = random.randrange(blocks)
        data = f"seq {seq} block {block} ".encode().ljust(64, b".") + os.urandom(BLOCK - 64)
        sha = hashlib.sha256(data).hexdigest()[:16]
        buf.seek(0)
        buf.write(data)
        out.write(f"LUNCLONE-INTENT {seq} {block} {sha}\n")
        os.pwrite(fd, buf, offset + block * BLOCK)
        out.write(f"LUNCLONE-ACK {seq} {block} {sha}\n")


def dump(uri: str, offset: int, blocks: int, tag: str) -> None:
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    out = console()
    for block in range(blocks):
        data = h.pread(BLOCK, offset + block * BLOCK)
        out.write(f"LUNCLONE-BLOCK {tag} {block} {hashlib.sha256(data).hexdigest()[:16]}\n")
    del h


def covers(source: str, clone: str, diff_json: str) -> int:
    import json
    import nbd
    ranges = [(r["offset"], r["offset"] + r["length"]) for r in json.loads(diff_json)]
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(source)
    b.connect_uri(clone)
    size, step, uncovered, differ = a.get_size(), 1 << 20, [], 0
    for off in range(0, size, step):
        x, y = a.pread(min(step, size - off), off), b.pread(min(step, size - off), off)
        if x == y:
            continue
        for i in range(0, len(x), BLOCK):
            if x[i:i + BLOCK] != y[i:i + BLOCK]:
                differ += 1
                at = off + i
                if not any(lo <= at and at + BLOCK <= hi for lo, hi in ranges):
                    uncovered.append(at)
    print(f"{differ} differing 4 KiB blocks, {len(uncovered)} outside the delta "
          f"({len(ranges)} ranges){': ' + str(uncovered[:5]) if uncovered else ''}")
    return 1 if uncovered else 0


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:] != ["nosync"])
    elif sys.argv[1] == "covers":
        sys.exit(covers(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        dump(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
