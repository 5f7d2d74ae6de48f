"""Store replacement killed at every step, and two writers at once (issue 13, defect 1).

A writer process replaces a store with ``save_store(..., overwrite=True)`` and dies by
``os._exit`` right after its k-th file-system operation on the store's directory (the entries
beside the store: the lock file, the temporary store, the swap, the removal of the old one,
also killed half-way; the files zarr writes inside the temporary store are one step, its
write), for every k until the write completes (one child imports pcmx and forks a writer per
k). After each kill a reader at the path finds the old or the new store, complete, and the
next write removes what the killed one left. Both with the atomic exchange of two directories
and with the two-rename fallback of filesystems without it.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import xarray as xr
from conftest import make_operator

import pcmx
from pcmx.errors import StoreError, StoreLockedError
from pcmx.io import atomic
from pcmx.io.readers import PcmxWarning

_KILLED = 77
_CHILD = r"""
import json, os, pickle, shutil, sys, traceback
import xarray as xr
import pcmx
from pcmx.io import atomic

root, template, new, mode = sys.argv[1:]
with open(new, "rb") as f:
    ds = pickle.load(f)  # in memory: this process starts no thread, so it forks safely


def replace(path, kill_at):
    # save_store(ds, path, overwrite=True), dying right after the step kill_at (none: 0)
    parent, log = os.path.dirname(os.path.abspath(path)), []
    if mode == "rename":  # a filesystem without an atomic exchange of two directories
        atomic.exchange = lambda a, b: False

    def step(name, target):
        log.append([name, os.path.basename(os.fspath(target))])
        if len(log) == kill_at:
            os._exit(77)

    def beside(args, kwargs):
        return (args and "dir_fd" not in kwargs and isinstance(args[0], (str, bytes, os.PathLike))
                and os.path.dirname(os.path.abspath(os.fsdecode(args[0]))) == parent)

    def counted(name, real, creates=None):
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            if beside(args, kwargs) and (creates is None or creates(*args)) and out is not False:
                step(name, args[0])
            return out
        return wrapper

    for name in ("replace", "rename", "mkdir", "makedirs", "symlink", "unlink", "remove", "rmdir"):
        setattr(os, name, counted(name, getattr(os, name)))
    os.open = counted("open", os.open, creates=lambda p, flags, *a: bool(flags & os.O_CREAT))
    atomic.exchange = counted("exchange", atomic.exchange)  # counted where it swapped
    real_rmtree, real_to_zarr = shutil.rmtree, xr.Dataset.to_zarr

    def rmtree(target, *args, **kwargs):
        if not beside((target,), {}):
            return real_rmtree(target, *args, **kwargs)
        if len(log) + 1 == kill_at:  # killed half-way: the group's metadata gone, chunks not yet
            os.unlink(os.path.join(target, "zarr.json"))
            step("rmtree (half)", target)
        log.append(["rmtree (half)", os.path.basename(target)])
        real_rmtree(target, *args, **kwargs)
        step("rmtree", target)

    def to_zarr(self, store, *args, **kwargs):  # zarr's files inside the temporary: one step
        out = real_to_zarr(self, store, *args, **kwargs)
        step("write", store)
        return out

    shutil.rmtree, xr.Dataset.to_zarr = rmtree, to_zarr
    pcmx.save_store(ds, path, overwrite=True)
    return log


def run(k):
    path = os.path.join(root, f"k{k}", "op.zarr")
    shutil.copytree(template, path)
    pid = os.fork()
    if pid == 0:  # the writer, killed by os._exit(77) at step k
        try:
            log = replace(path, k)
            with open(os.path.join(root, "steps.json"), "w") as f:
                json.dump(log, f)
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


codes = [run(0)]  # uninterrupted: counts the steps
with open(os.path.join(root, "steps.json")) as f:
    steps = json.load(f)
codes += [run(k) for k in range(1, len(steps) + 1)]
print(json.dumps({"steps": steps, "codes": codes}))
"""


def _values(ds) -> np.ndarray:
    return np.asarray(ds["coefficients"].values)


def _which(values, versions: dict) -> str:
    for name, v in versions.items():
        if values.shape == v.shape and np.array_equal(values, v):
            return name
    raise AssertionError("the store at the path is neither the old nor the new one")


def _open_pcmx(path):
    with warnings.catch_warnings(record=True) as caught:  # a restore warns, and says from where
        warnings.simplefilter("always")
        values = _values(pcmx.open_store(path))
    assert all(issubclass(w.category, PcmxWarning) and "restored the previous store" in str(w.message)
               for w in caught)
    return values, len(caught)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """An old store (to be replaced), the new one's data (pickled), and a third version."""
    d = tmp_path_factory.mktemp("versions")
    ds = {name: make_operator(seed=seed) for name, seed in (("old", 1), ("new", 2), ("third", 3))}
    for name, v in ds.items():
        pcmx.save_store(v, d / f"{name}.zarr")
    with open(d / "new.pickle", "wb") as f:
        pickle.dump(ds["new"], f)
    return d, {name: _values(v) for name, v in ds.items()}


@pytest.mark.parametrize("mode", ["exchange", "rename"])
def test_replacement_killed_after_every_step_leaves_old_or_new_complete(tmp_path, versions, mode):
    d, values = versions
    if mode == "exchange":
        probe = tmp_path / "probe"
        (probe / "a").mkdir(parents=True)
        (probe / "b").mkdir()
        if not atomic.exchange(probe / "a", probe / "b"):
            pytest.skip("this filesystem cannot exchange two directories")
    # one child imports pcmx once and forks a writer per k: k = 0 runs to the end (and counts
    # the steps), k = 1, 2... die right after step k
    run = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(d / "old.zarr"),
                          str(d / "new.pickle"), mode], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    steps, codes = out["steps"], out["codes"]
    names = [s[0] for s in steps]
    swap = ["exchange"] if mode == "exchange" else ["replace", "replace"]
    assert names == ["open", "mkdir", "write", *swap, "rmtree (half)", "rmtree", "unlink"], steps
    assert codes == [0] + [_KILLED] * len(steps), run.stderr
    path = tmp_path / "k0" / "op.zarr"
    assert _which(_values(xr.open_zarr(path, consolidated=False)), values) == "new"
    assert sorted(os.listdir(path.parent)) == ["op.zarr"]

    seen, missing, restored = [], [], 0
    for k in range(1, len(steps) + 1):
        path = tmp_path / f"k{k}" / "op.zarr"
        missing.append(not path.exists())
        if mode == "exchange":  # plain xarray, before pcmx touches anything
            plain = _which(_values(xr.open_zarr(path, consolidated=False)), values)
        values_k, warned = _open_pcmx(path)
        restored += warned
        seen.append(_which(values_k, values))
        if mode == "rename":  # once pcmx has looked, plain readers find it too
            plain = _which(_values(xr.open_zarr(path, consolidated=False)), values)
        assert plain == seen[-1]
        # the next write takes the lock over and leaves the store alone beside nothing
        pcmx.save_store(make_operator(seed=3), path, overwrite=True)
        assert sorted(os.listdir(path.parent)) == ["op.zarr"], (k, steps[k - 1])
        assert _which(_values(pcmx.open_store(path)), values) == "third"
    swapped = len(names) - names[::-1].index(swap[-1])  # the step that puts the new store in place
    assert seen == ["old"] * (swapped - 1) + ["new"] * (len(steps) - swapped + 1), list(zip(names, seen, strict=True))
    # an exchange never leaves the path empty; the fallback does only when killed between its
    # two renames, and the first pcmx reader puts the old store back
    window = names.index("replace") + 1 if mode == "rename" else None  # the step setting the old aside
    assert missing == [k == window for k in range(1, len(steps) + 1)]
    assert restored == sum(missing)


def _blocked_writer(path, new, ready, go):
    """A child replacing ``path`` that holds its write (and so the lock) until ``go`` exists."""
    code = r"""
import os, sys, time
import xarray as xr
import pcmx

path, new, ready, go = sys.argv[1:]
ds = xr.open_zarr(new, consolidated=False).load()
real = xr.Dataset.to_zarr


def to_zarr(self, store, *args, **kwargs):
    out = real(self, store, *args, **kwargs)
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    return out


xr.Dataset.to_zarr = to_zarr
pcmx.save_store(ds, path, overwrite=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, (path, new, ready, go))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(ready):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the writer never reached its write"
        time.sleep(0.01)
    return proc


def test_a_second_writer_fails_at_once_naming_the_first_and_leaves_nothing(tmp_path, versions):
    d, values = versions
    path = tmp_path / "out" / "op.zarr"
    shutil.copytree(d / "old.zarr", path)
    first = _blocked_writer(path, d / "new.zarr", tmp_path / "ready", tmp_path / "go")
    try:
        during = sorted(os.listdir(path.parent))
        assert len(during) == 3 and during[::2] == [".op.zarr.pcmx-lock", "op.zarr"]
        assert during[1].startswith(".op.zarr.pcmx-tmp-")
        message = (rf"op.zarr: being written by pid {first.pid} on host \S+ since \S+Z, running `.*`; "
                   "wait for that write to end, or stop it")
        with pytest.raises(StoreLockedError, match=message):
            pcmx.save_store(make_operator(seed=3), path, overwrite=True)
        assert sorted(os.listdir(path.parent)) == during  # the loser left nothing
        assert _which(_values(pcmx.open_store(path)), values) == "old"
        (tmp_path / "go").touch()
        err = first.communicate(timeout=120)[1]
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert sorted(os.listdir(path.parent)) == ["op.zarr"]
    assert _which(_values(pcmx.open_store(path)), values) == "new"


def test_a_killed_writer_frees_the_path_and_the_next_write_removes_its_leftovers(tmp_path, versions):
    d, values = versions
    path = tmp_path / "out" / "op.zarr"
    shutil.copytree(d / "old.zarr", path)
    first = _blocked_writer(path, d / "new.zarr", tmp_path / "ready", tmp_path / "go")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL
    left = sorted(os.listdir(path.parent))
    assert len(left) == 3 and left[1].startswith(".op.zarr.pcmx-tmp-")  # a complete temporary
    assert _which(_values(xr.open_zarr(path, consolidated=False)), values) == "old"
    with pytest.raises(StoreError, match="already exists"):  # a refused write cleans up too
        pcmx.save_store(make_operator(seed=3), path)
    assert sorted(os.listdir(path.parent)) == ["op.zarr"]
    (path.parent / left[1]).mkdir()  # another killed run's
    pcmx.save_store(make_operator(seed=3), path, overwrite=True)
    assert sorted(os.listdir(path.parent)) == ["op.zarr"]
    assert _which(_values(pcmx.open_store(path)), values) == "third"
