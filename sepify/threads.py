"""BLAS threads for sepify's own linear algebra (spectra, certificates, factors, least squares).

OpenBLAS splits even small decompositions across threads, and on a small or busy machine that costs
more than it gains: a 1536×1536 ``eigvalsh`` took 0.5 s on one thread and 11 s on two while another
process used the second core; a 1536×24 QR 1.3 ms against 117 ms.  Build pipelines run several jobs
at once, so sepify runs its numerics on ``SEPIFY_BLAS_THREADS`` threads (default 1) — onnxruntime's
own thread pools are not affected (``--threads`` sets those).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where buffers are made: sepify.command reads this module first
    import numpy as np

ENV = "SEPIFY_BLAS_THREADS"


def blas_threads() -> int | None:
    """The BLAS threads sepify uses (``SEPIFY_BLAS_THREADS``; 0 or ``default``: the library's own)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "default", ""):
        return None
    try:
        return max(1, int(value))
    except ValueError:
        return 1


@contextlib.contextmanager
def limited_blas(preload: tuple[str, ...] = ()):
    """BLAS limited to :func:`blas_threads` threads inside the block (re-entrant).

    ``preload``: modules that bring a BLAS library of their own (``scipy.linalg``: scipy's
    OpenBLAS), imported before the limit is set.  threadpoolctl limits the libraries loaded when
    the block is entered; one loaded inside it keeps its default threads (and limiting it later
    from a worker thread did not take), whose idle threads spin between calls: on a 2-core machine
    scipy's OpenBLAS spun through a sixth of a calibration's CPU time, beside sepify's two workers."""
    n = blas_threads()
    if n is None:
        yield
        return
    for name in preload:
        importlib.import_module(name)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def single_blas(fn=None, *, preload: tuple[str, ...] = ()):
    """Run ``fn`` with :func:`limited_blas` (for the API entry points); ``@single_blas(preload=…)``
    names modules to import first (see :func:`limited_blas`)."""
    if fn is None:
        return functools.partial(single_blas, preload=preload)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with limited_blas(preload):
            return fn(*args, **kwargs)

    return wrapper


THREADS_ENV = "SEPIFY_ANALYSIS_THREADS"


def cores() -> int:
    """Threads for sepify's per-weight analyses: ``SEPIFY_ANALYSIS_THREADS``, else the cores this
    process may run on (``audit --jobs N`` sets 1 in its worker processes: the processes share the
    cores already)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_pool_lock = threading.Lock()
_pool: tuple[int, int, Any] | None = None  # (pid, workers, ThreadPoolExecutor)
_worker = threading.local()


def _mark_worker() -> None:
    _worker.active = True


def _executor(workers: int):
    """One pool per process and size, kept between calls: its threads keep their scratch buffers
    (:func:`scratch`) from one call to the next.  A forked child makes its own."""
    global _pool
    from concurrent.futures import ThreadPoolExecutor

    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="sepify",
                                                              initializer=_mark_worker))
        return _pool[2]


def parallel_map(fn, items: list) -> list:
    """``[fn(x) for x in items]`` on one thread per core, in order.  For sepify's own numerics: its
    BLAS is single-threaded (above) and numpy releases the GIL in its linear algebra, so independent
    weights are analysed side by side (scipy's LAPACK wrappers keep the GIL: numpy's are used).
    Called from inside one of its own workers, it runs in that worker."""
    items = list(items)
    workers = min(cores(), len(items))
    if workers <= 1 or getattr(_worker, "active", False):
        return [fn(x) for x in items]
    return list(_executor(cores()).map(fn, items))


def start_each(fn):
    """``submit(x)`` starts ``fn(x)`` on the analysis threads and returns a callable that waits for
    its result (and raises its exception) — for items that become ready one at a time, so the
    workers start on the first while the caller still prepares the next (the audit reads each
    weight out of the model while the spectra of the ones before it are computed).  On one core,
    or inside one of the workers, ``fn(x)`` runs when its result is asked for."""
    if cores() <= 1 or getattr(_worker, "active", False):
        return lambda x: functools.partial(fn, x)
    pool = _executor(cores())
    return lambda x: pool.submit(fn, x).result


_scratch_lock = threading.Lock()
_scratch: dict[int, dict[str, np.ndarray]] = {}


def scratch(slot: str, shape, dtype) -> np.ndarray:
    """A C-contiguous temporary of this thread for ``slot``, reused from call to call (grown when
    too small).  Large temporaries allocated afresh cost page faults — zeroed huge pages, the kernel
    serializing the threads that fault — that took longer than the arithmetic around them (YOLOv8n's
    calibration: 7 s of system time in a 21 s run).  The array is valid until this thread asks for
    ``slot`` again; :func:`release_scratch` frees every thread's buffers."""
    import numpy as np

    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    key = threading.get_ident()
    with _scratch_lock:
        mine = _scratch.setdefault(key, {})
    buf = mine.get(slot)
    if buf is None or buf.nbytes < n:
        buf = mine[slot] = np.empty(max(n, 1), np.uint8)
    return buf[:n].view(dtype).reshape(shape)


def release_scratch() -> None:
    """Free the scratch buffers of every thread (at the end of a calibration)."""
    with _scratch_lock:
        _scratch.clear()


def releasing_scratch(fn):
    """Run ``fn``, then :func:`release_scratch` (for the entry points that use scratch buffers)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_scratch()

    return wrapper


__all__ = ["ENV", "THREADS_ENV", "blas_threads", "cores", "limited_blas", "parallel_map", "release_scratch",
           "releasing_scratch", "scratch", "single_blas", "start_each"]
