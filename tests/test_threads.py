"""Threads for sepify's own analyses: one per core unless told, results in order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from sepify.threads import THREADS_ENV, cores, parallel_map


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
