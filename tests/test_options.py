"""pcmx.options: set_options / get_options, validation, context manager, defaults, watchers."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import pcmx
from pcmx import options
from pcmx.errors import InputError


def test_defaults_are_the_machine_and_documented_values():
    got = pcmx.get_options()
    assert set(got) == {"threads", "blas_threads", "spectrum_cache_mb", "progress", "any_pixel_size"}
    assert got["threads"] == options.cpu_count() == len(os.sched_getaffinity(0))
    assert got["blas_threads"] is None and got["progress"] is False and got["any_pixel_size"] is False
    if "PCMX_SPECTRUM_CACHE_MB" not in os.environ:
        assert got["spectrum_cache_mb"] == 2048


def test_call_sets_for_the_process_and_none_restores_the_default():
    default = pcmx.get_options()["threads"]
    try:
        pcmx.set_options(threads=default + 3, progress=True)
        assert pcmx.get_options()["threads"] == default + 3
        assert pcmx.get_options()["progress"] is True
    finally:
        pcmx.set_options(threads=None, progress=None)
    assert pcmx.get_options()["threads"] == default
    assert pcmx.get_options()["progress"] is False


def test_context_manager_restores_nested_and_on_error():
    before = pcmx.get_options()
    with pcmx.set_options(threads=3, blas_threads=1):
        assert pcmx.get_options()["threads"] == 3
        with pcmx.set_options(threads=1, spectrum_cache_mb=7):
            assert pcmx.get_options()["threads"] == 1
            assert pcmx.get_options()["blas_threads"] == 1  # untouched by the inner block
            assert pcmx.get_options()["spectrum_cache_mb"] == 7
        assert pcmx.get_options()["threads"] == 3
        assert pcmx.get_options()["spectrum_cache_mb"] == before["spectrum_cache_mb"]
    assert pcmx.get_options() == before
    with pytest.raises(RuntimeError, match="inside"), pcmx.set_options(progress=True):
        raise RuntimeError("inside")
    assert pcmx.get_options() == before


def test_get_options_is_a_copy():
    got = pcmx.get_options()
    got["threads"] = 99
    assert pcmx.get_options()["threads"] != 99


@pytest.mark.parametrize("kw, words", [
    ({"thread": 2}, "unknown option(s) thread; the options are any_pixel_size, blas_threads, progress"),
    ({"threads": 0}, "threads=0: expected a positive integer"),
    ({"threads": 1.5}, "threads=1.5: expected a positive integer"),
    ({"threads": True}, "threads=True: expected a positive integer"),
    ({"threads": "4"}, "threads='4': expected a positive integer"),
    ({"blas_threads": -1}, "blas_threads=-1: expected a positive integer"),
    ({"spectrum_cache_mb": -1}, "spectrum_cache_mb=-1: expected a non-negative integer"),
    ({"progress": "yes"}, "progress='yes': expected True, False or None"),
])
def test_bad_names_and_values_name_the_option(kw, words):
    with pytest.raises(InputError) as err:
        pcmx.set_options(**kw)
    assert words in str(err.value)


def test_a_bad_value_changes_nothing():
    before = pcmx.get_options()
    with pytest.raises(InputError, match="progress"):
        pcmx.set_options(threads=before["threads"] + 1, progress=1)
    assert pcmx.get_options() == before


def test_numpy_integers_and_zero_cache_are_accepted():
    with pcmx.set_options(threads=np.int64(2), spectrum_cache_mb=0):
        got = pcmx.get_options()
        assert got["threads"] == 2 and type(got["threads"]) is int
        assert got["spectrum_cache_mb"] == 0


def test_watchers_see_changes_only():
    seen = []
    options.on_change("blas_threads", seen.append)
    try:
        with pcmx.set_options(blas_threads=2):
            pcmx.set_options(blas_threads=2)  # same value: no call
        assert seen == [2, None]
    finally:
        options._WATCHERS["blas_threads"].remove(seen.append)
    with pytest.raises(InputError, match="unknown option"):
        options.on_change("cache", print)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PCMX_SPECTRUM_CACHE_MB"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=120)


def test_environment_default_is_read_at_first_use_not_import():
    code = ("import os, pcmx, pcmx.operator\n"
            "os.environ['PCMX_SPECTRUM_CACHE_MB'] = '33'\n"
            "print(pcmx.get_options()['spectrum_cache_mb'])\n"
            "os.environ['PCMX_SPECTRUM_CACHE_MB'] = '44'\n"  # read once
            "print(pcmx.get_options()['spectrum_cache_mb'])\n")
    res = _run(code, PCMX_SPECTRUM_CACHE_MB="11")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["33", "33"]
    bad = _run("import pcmx\npcmx.get_options()", PCMX_SPECTRUM_CACHE_MB="lots")
    assert bad.returncode != 0
    assert "PCMX_SPECTRUM_CACHE_MB='lots': expected a non-negative integer" in bad.stderr
