import pytest

from lunclone import units
from lunclone.errors import InvalidArgument


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("64K", 65536), ("1M", 1 << 20), ("10G", 10 << 30),
    ("1T", 1 << 40), ("2MiB", 2 << 20), (" 8k ", 8192)])
def test_parse_size(text, value):
    assert units.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1Q", "-1", "1.5G", "G"])
def test_parse_size_refuses(text):
    with pytest.raises(InvalidArgument):
        units.parse_size(text)


@pytest.mark.parametrize("size", [0, -4096, 1000, 4097])
def test_volume_size_refuses(size):
    with pytest.raises(InvalidArgument):
        units.check_volume_size(size)


@pytest.mark.parametrize("size", [2048, 3 * 4096, 2 << 20, 0])
def test_extent_size_refuses(size):
    with pytest.raises(InvalidArgument):
        units.check_extent_size(size)


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "-x", "", "a\0b", "x" * 300, "a b"])
def test_bad_names(name):
    with pytest.raises(InvalidArgument):
        units.check_name(name)


@pytest.mark.parametrize("name", ["vol1", "db.data", "A_b-c", "0"])
def test_good_names(name):
    assert units.check_name(name) == name
