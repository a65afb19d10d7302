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
import os

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
def limited_blas():
    """BLAS limited to :func:`blas_threads` threads inside the block (re-entrant)."""
    n = blas_threads()
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def single_blas(fn):
    """Run ``fn`` with :func:`limited_blas` (for the API entry points)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with limited_blas():
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


def parallel_map(fn, items: list) -> list:
    """``[fn(x) for x in items]`` on one thread per core, in order.  For sepify's own numerics: its
    BLAS is single-threaded (above) and numpy releases the GIL in its linear algebra, so independent
    weights are analysed side by side (scipy's LAPACK wrappers keep the GIL: numpy's are used)."""
    workers = min(cores(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


__all__ = ["ENV", "THREADS_ENV", "blas_threads", "cores", "limited_blas", "parallel_map", "single_blas"]
