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
