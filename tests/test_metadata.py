import hashlib
import os
import sqlite3

import pytest

from lunclone.bitmap import Bitmap
from lunclone.errors import MetadataError
from lunclone.metadata import DB_NAME, Metadata, VolumeRecord


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_roundtrip_and_sparse_pages(tmp_path):
    md = Metadata(str(tmp_path))
    bm = Bitmap(1 << 20)
    bm.set(5)
    bm.set(900_000)
    with md.transaction() as tx:
        tx.put_volume(VolumeRecord("v", 1 << 30, 65536, created=1.0))
        tx.save_bitmap("v", "delta", bm)
    md.close()
    md = Metadata(str(tmp_path))
    assert [v.name for v in md.volumes()] == ["v"]
    back = md.load_bitmap("v", "delta", 1 << 20)
    assert list(back.iter_set()) == [5, 900_000]
    # Only the two non-zero pages are stored.
    db = sqlite3.connect(os.path.join(tmp_path, DB_NAME))
    assert db.execute("SELECT COUNT(*) FROM bitmaps").fetchone()[0] == 2


def test_failed_transaction_rolls_back(tmp_path):
    md = Metadata(str(tmp_path))
    with pytest.raises(RuntimeError):
        with md.transaction() as tx:
            tx.put_volume(VolumeRecord("v", 4096, 65536))
            raise RuntimeError("boom")
    assert md.volumes() == []


@pytest.mark.parametrize("damage", ["garbage", "zeroed", "truncated", "version"])
def test_damaged_database_refused_untouched(tmp_path, damage):
    md = Metadata(str(tmp_path))
    with md.transaction() as tx:
        tx.put_volume(VolumeRecord("v", 4096, 65536))
    md.close()
    path = os.path.join(tmp_path, DB_NAME)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    if damage == "garbage":
        open(path, "wb").write(os.urandom(8192))
    elif damage == "zeroed":
        open(path, "wb").write(bytes(8192))
    elif damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2 + 100])
    else:
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        db.commit()
        db.close()
    before = digest(path)
    with pytest.raises(MetadataError) as e:
        Metadata(str(tmp_path))
    assert "\n" not in e.value.message
    assert digest(path) == before


def test_replace_bitmap_stores_exactly_the_map(tmp_path):
    """replace_bitmap drops pages that became empty and writes only pages
    with bits set."""
    md = Metadata(str(tmp_path))
    old = Bitmap(1 << 20)
    for i in (5, 300_000, 900_000):
        old.set(i)
    new = Bitmap(1 << 20)
    new.set(300_001)
    new.set(600_000)
    with md.transaction() as tx:
        tx.save_bitmap("c", "delta", old, pages=old.used_pages())
        tx.save_bitmap("c", "pending", old, pages=old.used_pages())
    with md.transaction() as tx:
        tx.replace_bitmap("c", "delta", new)
    assert list(md.load_bitmap("c", "delta", 1 << 20).iter_set()) == [300_001, 600_000]
    assert list(md.load_bitmap("c", "pending", 1 << 20).iter_set()) == [5, 300_000, 900_000]
    db = sqlite3.connect(os.path.join(tmp_path, DB_NAME))
    assert db.execute("SELECT COUNT(*) FROM bitmaps WHERE kind='delta'").fetchone()[0] == 2
