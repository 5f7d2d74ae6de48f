import json
import os

import numpy as np
import pytest

from pcmx.io.atomic import (
    OLD_MARKER,
    TEMP_MARKER,
    atomic_dir,
    atomic_file,
    atomic_json,
    is_temporary,
    remove_temporaries,
    temporary_sibling,
)


def _write_text(text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write


def _write_tree(text):
    def write(tmp):
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "data.txt"), "w") as f:
            f.write(text)
    return write


def _replace_failing_on(monkeypatch, calls: set):
    """os.replace that raises on the given (1-based) calls and works otherwise."""
    real, seen = os.replace, []

    def replace(src, dst):
        seen.append((src, dst))
        if len(seen) in calls:
            raise OSError("rename refused")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_temporary_sibling_is_hidden_beside_the_final_path(tmp_path):
    tmp = temporary_sibling(str(tmp_path / "out.tif"))
    parent, name = os.path.split(tmp)
    assert parent == str(tmp_path)
    assert name.startswith(".out.tif" + TEMP_MARKER) and len(name) == len(".out.tif.pcmx-tmp-") + 8
    assert temporary_sibling(str(tmp_path / "out.tif")) != tmp
    assert OLD_MARKER in temporary_sibling(str(tmp_path / "a"), OLD_MARKER)


def test_atomic_file_leaves_only_the_result(tmp_path):
    final = tmp_path / "a.txt"
    assert atomic_file(final, _write_text("one")) == str(final)
    assert final.read_text() == "one"
    atomic_file(final, _write_text("two"))  # replaces
    assert final.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_file_failure_in_write_leaves_nothing(tmp_path):
    def write(tmp):
        _write_text("half")(tmp)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_file(tmp_path / "a.txt", write)
    assert list(tmp_path.iterdir()) == []
    # and over a previous file: unchanged
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        atomic_file(tmp_path / "a.txt", write)
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("a.txt", "old")]


def test_atomic_file_failed_replacement_keeps_the_previous_file(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old")
    seen = _replace_failing_on(monkeypatch, {1})
    with pytest.raises(OSError, match="rename refused"):
        atomic_file(tmp_path / "a.txt", _write_text("new"))
    assert len(seen) == 1 and seen[0][1] == str(tmp_path / "a.txt")
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("a.txt", "old")]


def test_atomic_json_writes_jsonable_values(tmp_path):
    path = tmp_path / "m.json"
    atomic_json(path, {"b": np.float32(0.5), "a": np.arange(3), "c": (1, "x")})
    text = path.read_text()
    assert json.loads(text) == {"a": [0, 1, 2], "b": 0.5, "c": [1, "x"]}
    assert text.index('"a"') < text.index('"b"')  # sorted keys
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_dir_writes_and_replaces_without_leftovers(tmp_path):
    final = tmp_path / "g.zarr"
    atomic_dir(final, _write_tree("one"))
    assert (final / "sub" / "data.txt").read_text() == "one"
    atomic_dir(final, _write_tree("two"))
    assert (final / "sub" / "data.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]  # no .pcmx-tmp- nor .pcmx-old-


def test_atomic_dir_failure_in_write_leaves_neither_result_nor_temporary(tmp_path):
    def write(tmp):
        _write_tree("half")(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_dir(tmp_path / "g.zarr", write)
    assert list(tmp_path.iterdir()) == []
    atomic_dir(tmp_path / "g.zarr", _write_tree("old"))
    with pytest.raises(OSError, match="disk full"):
        atomic_dir(tmp_path / "g.zarr", write)
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]
    assert (tmp_path / "g.zarr" / "sub" / "data.txt").read_text() == "old"


def test_atomic_dir_failed_replacement_puts_the_previous_directory_back(tmp_path, monkeypatch):
    atomic_dir(tmp_path / "g.zarr", _write_tree("old"))
    # call 1 sets the old directory aside, call 2 (the new one into place) fails, call 3 restores
    seen = _replace_failing_on(monkeypatch, {2})
    with pytest.raises(OSError, match="rename refused"):
        atomic_dir(tmp_path / "g.zarr", _write_tree("new"))
    assert len(seen) == 3 and OLD_MARKER in seen[0][1] and TEMP_MARKER in seen[1][0]
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]
    assert (tmp_path / "g.zarr" / "sub" / "data.txt").read_text() == "old"


def test_remove_temporaries_clears_leftovers_only(tmp_path):
    (tmp_path / ".a.zarr.pcmx-tmp-0123abcd").mkdir()
    (tmp_path / ".a.zarr.pcmx-tmp-0123abcd" / "x").write_text("x")
    (tmp_path / ".b.zarr.pcmx-old-deadbeef").mkdir()
    (tmp_path / ".c.json.pcmx-tmp-00000000").write_text("{")
    (tmp_path / ".00002.zarr.tmp-deadbeef").mkdir()  # checkpoints of earlier pcmx versions
    keep = ["a.zarr", ".hidden", "b.tmp-1", "manifest.json"]
    for name in keep:
        (tmp_path / name).write_text("")
    assert remove_temporaries(str(tmp_path)) == [
        ".00002.zarr.tmp-deadbeef", ".a.zarr.pcmx-tmp-0123abcd", ".b.zarr.pcmx-old-deadbeef",
        ".c.json.pcmx-tmp-00000000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert is_temporary(".x.pcmx-tmp-1") and not is_temporary("x.pcmx-tmp-1")
