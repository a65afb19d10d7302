"""Atomic writes: a temp file in the target folder, then rename — never a half-written output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    from .errors import UsageError

    if target.is_dir():
        raise UsageError(f"{target}: is a directory; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"{target}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file owner-only; give it the mode a plain open() would (or the file's own).
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp_path, mode)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def save_model(model, target: str | os.PathLike, *, external: bool | None = None, source=None) -> None:
    """Write ``model`` atomically so that the onnxruntime sepify depends on can load it.

    The IR version is clamped to what that onnxruntime accepts.  ``external=None`` means
    "only if needed" (over protobuf's 2 GiB limit); external data goes to ``<target name>.data``
    beside the model.  Both files are written in a temporary folder next to ``target`` and
    moved into place only when complete.  The proto is modified (IR version; weights moved
    out when saving externally).
    """
    import shutil

    import onnx

    from .load import PROTOBUF_LIMIT, ort_max_ir_version

    del source
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    model.ir_version = min(model.ir_version, ort_max_ir_version())
    if external is None:
        external = model.ByteSize() > PROTOBUF_LIMIT
    if not external:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(model.SerializeToString())
        return
    data_name = f"{target.name}.data"
    from .errors import UsageError

    if target.is_dir():
        raise UsageError(f"{target}: is a directory; give a file name")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    except OSError as exc:
        raise UsageError(f"{target}: cannot write here ({exc.strerror or exc})") from None
    try:
        onnx.save_model(model, str(staging / target.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        if (staging / data_name).exists():
            os.replace(staging / data_name, folder / data_name)
        os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
