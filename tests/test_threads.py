"""Threads for sepify's own analyses: one per core unless told, results in order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from sepify.threads import THREADS_ENV, cores, parallel_map, start_each


def test_parallel_map_keeps_the_order_of_its_items():
    def slow_first(i):
        time.sleep(0.02 if i == 0 else 0.0)  # the first item finishes last
        return i * i

    assert parallel_map(slow_first, list(range(6))) == [i * i for i in range(6)]
    assert parallel_map(slow_first, []) == []


def test_analysis_threads_follow_the_environment(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "1")
    assert cores() == 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert cores() == 3
    monkeypatch.setenv(THREADS_ENV, "none")  # not a count: the cores the process may use
    assert cores() >= 1


def test_parallel_map_keeps_one_pool_runs_nested_calls_inline_and_keeps_order(monkeypatch):
    from sepify import threads

    monkeypatch.setenv(threads.THREADS_ENV, "2")
    names = set()

    def inner(x):
        names.add(threading.current_thread().name)
        return x * x

    def outer(x):  # a parallel_map inside a worker runs in that worker (no deadlock on the pool)
        return threads.parallel_map(inner, [x, x + 1])

    assert threads.parallel_map(outer, list(range(6))) == [[x * x, (x + 1) ** 2] for x in range(6)]
    first = threads._executor(2)
    threads.parallel_map(inner, [1, 2, 3])
    assert threads._executor(2) is first  # the same pool (its threads keep their scratch buffers)
    assert all(n.startswith("sepify") for n in names)


def test_start_each_runs_items_as_they_come_and_hands_back_results_and_errors(monkeypatch):
    def work(x):
        if x == 3:
            raise ValueError("three")
        return x * x, threading.get_ident()

    monkeypatch.setenv(THREADS_ENV, "2")
    submit = start_each(work)
    handles = [submit(x) for x in range(6)]
    got = [h() for i, h in enumerate(handles) if i != 3]
    assert [value for value, _ in got] == [0, 1, 4, 16, 25]
    assert all(thread != threading.get_ident() for _, thread in got)  # on the workers
    try:
        handles[3]()
    except ValueError as exc:
        assert str(exc) == "three"
    else:
        raise AssertionError("the worker's exception was not raised to the caller")
    # One core: nothing starts until the result is asked for, and then in the caller's thread.
    monkeypatch.setenv(THREADS_ENV, "1")
    ran = []
    lazy = start_each(lambda x: ran.append(threading.get_ident()) or x)
    handle = lazy(7)
    assert ran == [] and handle() == 7 and ran == [threading.get_ident()]


def test_scratch_is_reused_per_thread_and_slot_and_released():
    from sepify import threads

    a = threads.scratch("t", (4, 5), np.float32)
    a[:] = 7
    b = threads.scratch("t", (2, 3), np.float64)  # smaller: the same memory
    assert np.shares_memory(a, b) and b.flags.c_contiguous and b.shape == (2, 3)
    c = threads.scratch("t", (100, 100), np.float32)  # larger: grown
    assert c.shape == (100, 100) and not np.shares_memory(a, c)
    assert not np.shares_memory(c, threads.scratch("other", (10,), np.float32))
    threads.release_scratch()
    assert not np.shares_memory(c, threads.scratch("t", (100, 100), np.float32))


def test_calibration_and_planning_give_the_same_model_on_one_thread_and_on_two(monkeypatch):
    """Layers run side by side (reference pass, waves, plan curves, realization) but each system
    is one thread's own and rows keep their order: the written weights are bit for bit the same."""
    import onnx.numpy_helper as nh

    import sepify
    from sepify import threads

    def weights(model):
        return {t.name: nh.to_array(t) for t in model.graph.initializer}

    sample = str(Path(__file__).resolve().parent.parent / "sample_models" / "vgg_small.onnx")
    got = {}
    for n in ("1", "2"):
        monkeypatch.setenv(threads.THREADS_ENV, n)
        cal, _, _ = sepify.calibrated_rewrite(sample, sepify.Policy(budget=0.6), "random",
                                              options=sepify.CalibrationOptions(samples=8))
        plain, _ = sepify.rewrite(sample, sepify.Policy(budget=0.6))
        got[n] = (weights(cal), weights(plain))
    for one, two in zip(got["1"], got["2"]):
        assert one.keys() == two.keys() and len(one) > 0
        for k in one:
            np.testing.assert_array_equal(one[k], two[k], err_msg=k)


def test_calibration_holds_scipys_blas_to_one_thread_too():
    """scipy brings its own OpenBLAS, loaded on first use: calibration preloads it so that the BLAS
    limit covers it (its idle threads had spun through a sixth of a calibration's CPU time).  In a
    fresh interpreter, scipy not yet imported; every BLAS library at one thread while the layers'
    curves are computed on the worker threads, and the library's own setting back afterwards."""
    import subprocess
    import sys

    code = r"""
import os, sys
os.environ.pop("SEPIFY_BLAS_THREADS", None)
assert "scipy" not in sys.modules
import sepify
import sepify.calibration.profiling as P
from threadpoolctl import threadpool_info
seen = []
curve = P.curve
def spy(*a, **k):
    seen.append({i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
    return curve(*a, **k)
P.curve = spy
sepify.calibrate(sys.argv[1], sepify.Policy(budget=0.5), "random", samples=4)
assert seen and any("scipy_openblas-" in f or "openblas" in f and "64_" not in f for d in seen for f in d), seen
assert all(n == 1 for d in seen for n in d.values()), seen
print(max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"))
"""
    model = Path(__file__).resolve().parents[1] / "sample_models" / "vgg_small.onnx"
    res = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_command_starts_numpys_blas_with_one_thread_unless_told_otherwise():
    """``sepify`` sets OPENBLAS_NUM_THREADS=1 before numpy loads (an OpenBLAS started with more
    threads spins its idle helpers for ~0.15 s of CPU), and leaves alone a user's own setting, a
    larger SEPIFY_BLAS_THREADS, and a process where numpy is already loaded."""
    import os
    import subprocess
    import sys

    probe = ("import os, sys; from sepify.command import quiet_blas; {pre}changed = quiet_blas(); import numpy; "
             "from threadpoolctl import threadpool_info; "
             "print(changed, os.environ.get('OPENBLAS_NUM_THREADS'), "
             "max(i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'))")
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                             "MKL_NUM_THREADS", "SEPIFY_BLAS_THREADS")}

    def run(pre="", **env):
        res = subprocess.run([sys.executable, "-c", probe.format(pre=pre)], capture_output=True, text=True,
                             env={**base, **env}, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert run() == ["True", "1", "1"]
    assert run(OPENBLAS_NUM_THREADS="2")[:2] == ["False", "2"]
    assert run(OMP_NUM_THREADS="2")[:2] == ["False", "None"]
    assert run(SEPIFY_BLAS_THREADS="2")[:2] == ["False", "None"]
    assert run(pre="import numpy; ")[:2] == ["False", "None"]
