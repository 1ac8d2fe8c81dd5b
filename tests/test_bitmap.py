import random

from lunclone.bitmap import PAGE_BITS, Bitmap, extent_range


def test_set_test_clear_count():
    b = Bitmap(100_000)
    idx = random.Random(1).sample(range(100_000), 500)
    for i in idx:
        b.set(i)
    assert b.count() == 500
    assert list(b.iter_set()) == sorted(idx)
    assert all(b.test(i) for i in idx)
    for i in idx[:100]:
        b.clear(i)
    assert b.count() == 400
    assert {i // PAGE_BITS for i in idx} <= b.dirty_pages


def test_iter_set_from_start():
    b = Bitmap(64)
    for i in (1, 9, 10, 63):
        b.set(i)
    assert list(b.iter_set(9)) == [9, 10, 63]
    assert list(b.iter_set(11)) == [63]


def test_union_assign_set_all():
    a, b = Bitmap(70_000), Bitmap(70_000)
    a.set(3)
    b.set(69_999)
    a.take_dirty()
    a.union(b)
    assert list(a.iter_set()) == [3, 69_999]
    assert a.take_dirty() == [69_999 // PAGE_BITS]
    c = Bitmap(70_000)
    c.set_all()
    assert c.count() == 70_000
    c.assign(b)
    assert list(c.iter_set()) == [69_999]


def test_extent_range():
    assert list(extent_range(0, 4096, 16)) == [0]
    assert list(extent_range(65535, 2, 16)) == [0, 1]
    assert list(extent_range(65536, 65536, 16)) == [1]


def resident_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_large_map_costs_memory_only_for_pages_with_bits():
    """A 16 TiB volume's map (32 MiB) with a few bits set, copied and
    united: only the written pages become resident."""
    nbits = (16 << 40) >> 16
    before = resident_kib()
    maps = [Bitmap(nbits) for _ in range(4)]
    for i in (0, nbits // 2, nbits - 1):
        maps[0].set(i)
    maps[1].union(maps[0])
    maps[2].assign(maps[0])
    maps[3] = maps[0].copy()
    grown = resident_kib() - before
    assert grown < 4 * 1024, f"{grown} KiB resident for 4 maps of 32 MiB"
    for b in maps:
        assert list(b.iter_set()) == [0, nbits // 2, nbits - 1]
        assert b.test(nbits - 1) and not b.test(nbits - 2)
        assert b.bits[(nbits - 1) >> 3] >> ((nbits - 1) & 7) & 1 == 1  # an int, as a bytearray's


def test_copy_is_independent_and_keeps_counts():
    a = Bitmap(200_000)
    for i in (7, 40_000, 199_999):
        a.set(i)
    b = a.copy(key=("c", "delta"))
    b.clear(7)
    a.set(8)
    assert list(a.iter_set()) == [7, 8, 40_000, 199_999]
    assert list(b.iter_set()) == [40_000, 199_999]
    assert b.count() == 2 and b.key == ("c", "delta") and a.count() == 4


def test_union_pages_is_what_union_writes():
    a, b = Bitmap(200_000), Bitmap(200_000)
    a.set(3)
    a.set(100_000)
    b.set(100_000)  # already in a: that page does not change
    b.set(150_000)
    b.set(4)
    pages = a.union_pages(b)
    assert sorted(pages) == [0, 150_000 // PAGE_BITS]
    assert list(a.iter_set()) == [3, 100_000]  # unchanged
    a.take_dirty()
    a.union(b)
    assert a.take_dirty() == sorted(pages)
    for p, data in pages.items():
        assert a.page(p) == data


def test_a_map_of_one_extent():
    b = Bitmap(1)
    b.set(0)
    assert list(b.iter_set()) == [0] and b.count() == 1 and len(b.page(0)) == 1


def test_load_page_counts_whole_and_partial_pages():
    b = Bitmap(PAGE_BITS + 100)
    b.set(5)
    b.load_page(0, b"\x03" + bytes(4095))  # a whole page replaces what was there
    assert list(b.iter_set()) == [0, 1] and b.count() == 2
    b.load_page(1, b"\x01" * 13)  # the last page is 13 bytes long
    assert b.count() == 2 + 13 and b.test(PAGE_BITS) and b.test(PAGE_BITS + 96)
    b.load_page(0, b"\x80\x00")  # a short piece: the rest of the page stays
    b.set(4095 * 8)
    b.load_page(0, b"\x81")
    assert list(b.iter_set())[:3] == [0, 7, 4095 * 8] and b.count() == 3 + 13


def _naive_runs(bits):
    out = []
    for i in sorted(bits):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return [tuple(r) for r in out]


def test_runs_match_the_set_bits():
    """Runs across bytes, pages and the map's end; whole 0xFF spans; single bits."""
    rng = random.Random(7)
    n = 3 * 32768 + 11  # three pages and a partial one
    for trial in range(40):
        bm, bits = Bitmap(n), set()
        for _ in range(rng.choice([0, 1, 5, 50])):
            start = rng.randrange(n)
            for i in range(start, min(n, start + rng.choice([1, 3, 8, 9, 700, 40000]))):
                bm.set(i)
                bits.add(i)
        if trial == 0:
            bm.set_all()
            bits = set(range(n))
        assert list(bm.runs()) == _naive_runs(bits), trial


def test_a_full_large_map_is_one_run():
    bm = Bitmap(1 << 24)  # 1 TiB of 64 KiB extents
    bm.set_all()
    assert list(bm.runs()) == [(0, 1 << 24)]


def test_any_in_matches_the_set_bits():
    rng = random.Random(3)
    n = 2 * 32768 + 5
    for _ in range(30):
        bm, bits = Bitmap(n), set()
        for _ in range(rng.choice([0, 1, 3, 20])):
            i = rng.randrange(n)
            bm.set(i)
            bits.add(i)
        for _ in range(60):
            a = rng.randrange(n)
            b = a + rng.choice([1, 2, 7, 8, 9, 100, 5000, 40000])
            assert bm.any_in(a, b) == any(a <= i < b for i in bits), (a, b)
