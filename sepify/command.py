"""The ``sepify`` command's entry point (``python -m sepify`` too).  It imports nothing heavy
before :func:`quiet_blas` has settled how many threads numpy's BLAS starts with, which has to
happen before numpy is imported; then it runs :func:`sepify.cli.main.run`."""

from __future__ import annotations

import os
import sys

# What OpenBLAS, OpenMP or MKL read for their thread count when they load: a user's setting is kept.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def quiet_blas() -> bool:
    """Start numpy's BLAS with one thread when sepify's numerics use one (``SEPIFY_BLAS_THREADS``
    unset or 1, see :mod:`sepify.threads`) and the user set no BLAS thread count.  An OpenBLAS
    started with more threads spins its idle helper threads after loading — ~0.15 s of a core
    while the command imports and reads the model — though sepify never gives them work.
    Does nothing once numpy is imported.  True when it set ``OPENBLAS_NUM_THREADS``."""
    from .threads import blas_threads

    if "numpy" in sys.modules or any(v in os.environ for v in BLAS_THREAD_VARS) or blas_threads() != 1:
        return False
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    return True


def run() -> None:
    """The ``sepify`` command: :func:`quiet_blas`, then :func:`sepify.cli.main.run`."""
    quiet_blas()
    from .cli.main import run as run_command

    run_command()


__all__ = ["BLAS_THREAD_VARS", "quiet_blas", "run"]
