"""The plugin against a real nbdkit, driven with libnbd; the backing
sparse file is the reference."""
import os
import random

import nbd
import pytest

from helpers import MiB


def file_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_exports_listed_and_created_volume_served_at_once(daemon):
    daemon.cli("create", "a", "--size", "4M")
    h = daemon.connect("a")
    assert h.get_size() == 4 * MiB
    daemon.cli("create", "b", "--size", "8M")
    h2 = daemon.connect("b")
    assert h2.get_size() == 8 * MiB
    lister = nbd.NBD()
    lister.set_opt_mode(True)
    lister.connect_uri(f"nbd+unix:///?socket={daemon.nbd_socket}")
    names = []
    lister.opt_list(lambda name, desc: names.append(name))
    assert {"a", "b"} <= set(names)


def test_unknown_export_refused(daemon):
    with pytest.raises(nbd.Error) as e:
        daemon.connect("nope")
    assert "nope" in str(e.value) or "export" in str(e.value)


def test_flags_advertised(daemon):
    daemon.cli("create", "v", "--size", "4M")
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(daemon.uri("v"))
    assert h.can_multi_conn() and h.can_flush() and h.can_fua()
    assert h.can_trim() and h.can_zero() and h.can_fast_zero()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    # the plugin's own extents, not nbdkit's stand-in (all data) for a
    # plugin without them: a hole, then the written MiB
    h.pwrite(b"d" * MiB, MiB)
    assert block_status(h, 2 * MiB, 0) == [(MiB, nbd.STATE_HOLE | nbd.STATE_ZERO), (MiB, 0)]


def block_status(h, length, offset):
    """[(length, flags)] of base:allocation over the range, runs merged."""
    runs = []

    def got(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            runs.extend(zip(entries[0::2], entries[1::2]))
    h.block_status(length, offset, got)
    merged = []
    for n, flags in runs:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + n, flags)
        else:
            merged.append((n, flags))
    return merged


def test_random_io_matches_backing_file(daemon):
    daemon.cli("create", "v", "--size", "16M", "--extent-size", "64K")
    path = daemon.volume_path("v")
    model = bytearray(16 * MiB)
    h = daemon.connect("v")
    h2 = daemon.connect("v")
    rng = random.Random(7)
    for i in range(300):
        off = rng.randrange(0, 16 * MiB - 4096) & ~511
        n = rng.choice([512, 4096, 65536, 200_000]) 
        n = min(n, 16 * MiB - off)
        op = rng.choice(["write", "write", "trim", "zero", "read"])
        c = h if i % 2 else h2
        if op == "write":
            data = rng.randbytes(n)
            c.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 7 == 0 else 0)
            model[off:off + n] = data
        elif op == "trim":
            c.trim(n, off)
            model[off:off + n] = bytes(n)
        elif op == "zero":
            c.zero(n, off)
            model[off:off + n] = bytes(n)
        else:
            assert c.pread(n, off) == model[off:off + n]
    h.flush()
    assert h.pread(16 * MiB, 0) == model
    assert file_bytes(path, 0, 16 * MiB) == model


def test_block_status_reports_holes(daemon):
    daemon.cli("create", "v", "--size", "8M")
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(daemon.uri("v"))
    h.pwrite(b"x" * 65536, 2 * MiB)
    seen = []

    def cb(metacontext, offset, entries, err):
        seen.extend(entries)
        return 0
    h.block_status(8 * MiB, 0, cb)
    # entries are (length, flags) pairs
    runs, pos = [], 0
    for length, flags in zip(seen[::2], seen[1::2]):
        runs.append((pos, length, flags))
        pos += length
    data = [(o, n) for o, n, f in runs if not f & nbd.STATE_HOLE]
    assert data and data[0][0] <= 2 * MiB < data[0][0] + data[0][1]
    assert any(f & nbd.STATE_HOLE for _, _, f in runs)


def test_trim_punches_hole(daemon):
    daemon.cli("create", "v", "--size", "4M")
    h = daemon.connect("v")
    h.pwrite(os.urandom(MiB), 0)
    h.flush()
    before = os.stat(daemon.volume_path("v")).st_blocks
    h.trim(MiB, 0)
    h.flush()
    assert os.stat(daemon.volume_path("v")).st_blocks < before
    assert h.pread(4096, 0) == bytes(4096)


def test_out_of_range_request_fails_cleanly(daemon):
    daemon.cli("create", "v", "--size", "4M")
    h = daemon.connect("v")
    with pytest.raises(nbd.Error):
        h.pread(4096, 4 * MiB)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 4 * MiB - 100)
    assert h.pread(4, 0) == bytes(4)


def test_data_survives_restart(daemon):
    daemon.cli("create", "v", "--size", "4M")
    h = daemon.connect("v")
    h.pwrite(b"persist!" * 512, MiB)
    h.flush()
    del h
    assert daemon.stop() == 0
    daemon.start()
    h = daemon.connect("v")
    assert h.pread(4096, MiB) == b"persist!" * 512
