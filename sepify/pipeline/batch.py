"""Auditing many models (a folder, a model registry): every model gets a status, one failure never
stops the others, optionally in parallel processes.

:func:`expand_models` turns the command line's files and folders into model paths (a path that
does not exist is refused before any work); :func:`audit_models` audits each — in ``jobs``
worker processes when asked (``concurrent.futures.ProcessPoolExecutor``, spawned: no forked
onnxruntime threads) — and returns an :class:`AuditBatch` with one :class:`ModelStatus` per
path, in the order given.  A model that fails (bad input, or a bug) carries its one-line error; a
worker process that dies (a crash inside onnxruntime) costs only the model it was auditing: the
models in flight are retried one per fresh process, so the culprit is found and named.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import SepifyError, UsageError
from ..serialize import SCHEMA_VERSION, dumps
from .audit import AuditReport, audit


def expand_models(items: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as the ``.onnx`` files below them (sorted).  A missing path, or a
    folder without ``.onnx`` files, is a UsageError (nothing has been audited yet)."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.rglob("*.onnx"))
            if not found:
                raise UsageError(f"{p}: folder holds no .onnx files")
            paths.extend(found)
        elif not p.exists():
            raise UsageError(f"{p}: no such file or folder")
        else:
            paths.append(p)
    return paths


@dataclass
class ModelStatus:
    """One model of a batch: its report, or the error that stopped its audit."""

    path: str
    report: AuditReport | None = None
    error: str | None = None
    exit_code: int = 0  # the CLI exit code the error stands for (2: bad input, 3: a bug)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.report is not None:
            return {"status": "ok", **self.report.to_dict()}
        return {"status": "error", "model": self.path, "error": self.error}


@dataclass
class AuditBatch:
    entries: list[ModelStatus] = field(default_factory=list)

    @property
    def reports(self) -> list[AuditReport]:
        return [e.report for e in self.entries if e.report is not None]

    @property
    def failed(self) -> list[ModelStatus]:
        return [e for e in self.entries if not e.ok]

    def __repr__(self) -> str:
        return f"AuditBatch(models={len(self.entries)}, failed={len(self.failed)})"

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "models": [e.to_dict() for e in self.entries],
                "failed": len(self.failed)}

    def to_json(self) -> str:
        return dumps(self.to_dict())


def audit_one(path: str, kwargs: dict[str, Any]) -> ModelStatus:
    """Audit one model and never raise: the error's first line (and its exit code) instead."""
    try:
        return ModelStatus(path, audit(path, **kwargs))
    except SepifyError as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return ModelStatus(path, error=msg if path in msg else f"{path}: {msg}", exit_code=exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - one model's bug must not stop the others
        return ModelStatus(path, error=f"{path}: internal error: {type(exc).__name__}: {exc}", exit_code=3)


def audit_models(paths: Sequence[str | Path], *, jobs: int = 1, on_done: Callable[[ModelStatus], None] | None = None,
                 **kwargs) -> AuditBatch:
    """Audit every path (``kwargs`` as for :func:`sepify.audit`); ``jobs`` > 1 audits in that many
    worker processes.  ``on_done`` is called as each model finishes (for a progress bar)."""
    from ..errors import ParameterError

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ParameterError("jobs", jobs, "needs a positive number of worker processes")
    names = [str(p) for p in paths]
    done: dict[int, ModelStatus] = {}

    def finish(i: int, status: ModelStatus) -> None:
        done[i] = status
        if on_done is not None:
            on_done(status)

    if jobs == 1 or len(names) == 1:
        for i, name in enumerate(names):
            finish(i, audit_one(name, kwargs))
    else:
        _parallel(names, jobs, kwargs, finish)
    return AuditBatch([done[i] for i in range(len(names))])


def _single_threaded() -> None:
    """Worker start-up: the processes already share the cores, so each analyses on one thread."""
    import os

    from ..threads import THREADS_ENV

    os.environ[THREADS_ENV] = "1"


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    import multiprocessing  # only when auditing in processes (--jobs)

    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_single_threaded)


def _parallel(names: list[str], jobs: int, kwargs: dict[str, Any], finish) -> None:
    todo = list(range(len(names)))
    with _pool(min(jobs, len(names))) as pool:
        futures = {pool.submit(audit_one, names[i], kwargs): i for i in todo}
        broken: list[int] = []
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                finish(i, fut.result())
            except cf.process.BrokenProcessPool:
                broken.append(i)
    # A worker died (and took the pool with it): the models it may have held, one per process.
    for i in sorted(broken):
        with _pool(1) as pool:
            try:
                finish(i, pool.submit(audit_one, names[i], kwargs).result())
            except cf.process.BrokenProcessPool:
                finish(i, ModelStatus(names[i], error=f"{names[i]}: the audit process died (a crash in onnxruntime "
                                                      "or out of memory)", exit_code=3))


__all__ = ["AuditBatch", "ModelStatus", "audit_models", "audit_one", "expand_models"]
