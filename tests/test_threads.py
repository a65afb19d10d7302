"""Threads for sepify's own analyses: one per core unless told, results in order."""

from __future__ import annotations

import time

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
