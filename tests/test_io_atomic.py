import json
import os
import re
import socket
import time

import numpy as np
import pytest

from pcmx.errors import StoreLockedError
from pcmx.io import atomic
from pcmx.io.atomic import (
    OLD_MARKER,
    TEMP_MARKER,
    atomic_dir,
    atomic_file,
    atomic_json,
    clean_leftovers,
    exchange,
    is_temporary,
    leftovers,
    lock_path,
    recover_missing,
    remove_temporaries,
    temporary_sibling,
    writer_lock,
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
    # where the filesystem cannot exchange two directories, the old one is renamed aside:
    # call 1 sets the old directory aside, call 2 (the new one into place) fails, call 3 restores
    atomic_dir(tmp_path / "g.zarr", _write_tree("old"))
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    seen = _replace_failing_on(monkeypatch, {2})
    with pytest.raises(OSError, match="rename refused"):
        atomic_dir(tmp_path / "g.zarr", _write_tree("new"))
    assert len(seen) == 3 and OLD_MARKER in seen[0][1] and TEMP_MARKER in seen[1][0]
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]
    assert (tmp_path / "g.zarr" / "sub" / "data.txt").read_text() == "old"
    # and without the failure the fallback replaces, leaving nothing beside
    monkeypatch.undo()
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    atomic_dir(tmp_path / "g.zarr", _write_tree("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]
    assert (tmp_path / "g.zarr" / "sub" / "data.txt").read_text() == "new"


def _skip_without_exchange(directory):
    a, b = directory / ".probe-a", directory / ".probe-b"
    a.mkdir()
    b.mkdir()
    supported = exchange(a, b)
    a.rmdir()
    b.rmdir()
    if not supported:
        pytest.skip("this filesystem cannot exchange two paths")


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    _skip_without_exchange(tmp_path)
    _write_tree("a")(str(tmp_path / "a"))
    _write_tree("b")(str(tmp_path / "b"))
    assert exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "sub" / "data.txt").read_text() == "b"
    assert (tmp_path / "b" / "sub" / "data.txt").read_text() == "a"
    with pytest.raises(FileNotFoundError, match="missing"):
        exchange(tmp_path / "a", tmp_path / "missing")
    assert (tmp_path / "a" / "sub" / "data.txt").read_text() == "b"


def test_atomic_dir_replaces_by_exchange_never_leaving_the_path_empty(tmp_path, monkeypatch):
    _skip_without_exchange(tmp_path)
    final = tmp_path / "g.zarr"
    atomic_dir(final, _write_tree("old"))
    real, states = atomic.exchange, []

    def watched(a, b):
        done = real(a, b)
        states.append((done, (final / "sub" / "data.txt").read_text()))
        return done

    monkeypatch.setattr(atomic, "exchange", watched)
    monkeypatch.setattr(os, "rename", None)  # no rename may take the old directory away
    monkeypatch.setattr(os, "replace", None)
    atomic_dir(final, _write_tree("new"))
    assert states == [(True, "new")]
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]


def test_atomic_dir_failed_exchange_keeps_the_previous_directory(tmp_path, monkeypatch):
    atomic_dir(tmp_path / "g.zarr", _write_tree("old"))

    def refuse(a, b):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic, "exchange", refuse)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_dir(tmp_path / "g.zarr", _write_tree("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]
    assert (tmp_path / "g.zarr" / "sub" / "data.txt").read_text() == "old"


def test_atomic_dir_check_refuses_before_anything_is_written(tmp_path):
    atomic_dir(tmp_path / "g.zarr", _write_tree("old"))
    written = []

    def check(final):
        raise FileExistsError(f"{final}: no")

    with pytest.raises(FileExistsError, match="g.zarr: no"):
        atomic_dir(tmp_path / "g.zarr", written.append, check=check)
    assert written == []
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]


def test_writer_lock_refuses_a_second_writer_naming_the_first(tmp_path):
    final = tmp_path / "g.zarr"
    with writer_lock(final) as lock:
        assert lock == lock_path(final) == str(tmp_path / ".g.zarr.pcmx-lock")
        holder = json.loads(open(lock).read())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        message = (rf"g.zarr: being written by pid {os.getpid()} on host {re.escape(socket.gethostname())} "
                   rf"since {holder['since']}, running `.*`; wait for that write to end")
        with pytest.raises(StoreLockedError, match=message), writer_lock(final):
            pass
        with pytest.raises(StoreLockedError, match=message):
            atomic_dir(final, _write_tree("second"))
        assert sorted(p.name for p in tmp_path.iterdir()) == [".g.zarr.pcmx-lock"]
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock
    with writer_lock(final):  # and can be taken again
        pass


def test_a_lock_file_left_by_a_killed_writer_locks_nothing(tmp_path):
    final = tmp_path / "g.zarr"
    (tmp_path / ".g.zarr.pcmx-lock").write_text('{"pid": 1, "host": "gone"}')  # no flock on it
    atomic_dir(final, _write_tree("one"))
    assert [p.name for p in tmp_path.iterdir()] == ["g.zarr"]


def _leftover(tmp_path, name, text=None):
    path = tmp_path / name
    if text is None:
        path.mkdir()
    else:
        _write_tree(text)(str(path))
    return path


def test_clean_leftovers_restores_the_last_store_set_aside_and_removes_the_rest(tmp_path):
    final = tmp_path / "g.zarr"
    _leftover(tmp_path, ".g.zarr.pcmx-old-00000001", "older")
    time.sleep(0.01)  # distinct ctimes
    _leftover(tmp_path, ".g.zarr.pcmx-old-00000002", "last")
    _leftover(tmp_path, ".g.zarr.pcmx-tmp-0000000a", "new, maybe half")
    (tmp_path / ".g.zarr.pcmx-tmp-0000000b").write_text("a file's temporary")
    others = [_leftover(tmp_path, ".h.zarr.pcmx-tmp-0000000c"), _leftover(tmp_path, ".g.zarr2.pcmx-old-0000000d"),
              _leftover(tmp_path, ".g.zarr.pcmx-tmp-live")]  # not ours / not a name we make
    assert [os.path.basename(p) for p in leftovers(final)] == [
        ".g.zarr.pcmx-old-00000001", ".g.zarr.pcmx-old-00000002", ".g.zarr.pcmx-tmp-0000000a",
        ".g.zarr.pcmx-tmp-0000000b"]
    restored, removed = clean_leftovers(final)
    assert os.path.basename(restored) == ".g.zarr.pcmx-old-00000002"
    assert [os.path.basename(p) for p in removed] == [
        ".g.zarr.pcmx-old-00000001", ".g.zarr.pcmx-tmp-0000000a", ".g.zarr.pcmx-tmp-0000000b"]
    assert (final / "sub" / "data.txt").read_text() == "last"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["g.zarr", *(p.name for p in others)])
    # with the store in place, copies set aside are only removed
    _leftover(tmp_path, ".g.zarr.pcmx-old-00000003", "stale")
    assert clean_leftovers(final) == (None, [str(tmp_path / ".g.zarr.pcmx-old-00000003")])
    assert (final / "sub" / "data.txt").read_text() == "last"


def test_atomic_dir_and_readers_recover_what_a_killed_replacement_left(tmp_path):
    final = tmp_path / "g.zarr"
    _leftover(tmp_path, ".g.zarr.pcmx-old-00000001", "old")  # killed between its two renames
    _leftover(tmp_path, ".g.zarr.pcmx-tmp-00000002", "new")
    assert recover_missing(final) == str(tmp_path / ".g.zarr.pcmx-old-00000001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.zarr"]
    assert (final / "sub" / "data.txt").read_text() == "old"
    assert recover_missing(final) is None  # nothing to do
    _leftover(tmp_path, ".g.zarr.pcmx-tmp-00000003", "half")  # killed mid-write
    atomic_dir(final, _write_tree("third"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.zarr"]
    assert (final / "sub" / "data.txt").read_text() == "third"


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
