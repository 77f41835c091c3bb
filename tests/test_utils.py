"""The one atomic file writer (``wsi_ssl._utils.atomic_path`` / ``atomic_write_bytes``)."""

from __future__ import annotations

import pytest

from wsi_ssl._utils import atomic_path, atomic_write_bytes


def test_atomic_write_bytes_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]  # no temporary left


def test_atomic_path_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "slide.tif"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"half of a new file")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.tif"]


def test_atomic_path_temporaries_are_unique_per_call(tmp_path):
    with atomic_path(tmp_path / "x") as a, atomic_path(tmp_path / "x") as b:
        assert a != b
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert (tmp_path / "x").read_bytes() == b"a"  # the last to finish wins, whole
