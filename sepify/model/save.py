"""Atomic writes: a temp file in the target folder, then rename — never a half-written output."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from onnx.external_data_helper import ExternalDataInfo

from ..errors import UsageError
from .load import PROTOBUF_LIMIT, iter_all_tensors, ort_max_ir_version, tensor_nbytes


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = write_target(target)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"{target}: is a directory; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"{target}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file owner-only; give it the mode a plain open() would (or the file's own).
    os.chmod(tmp_path, _mode_for(target))
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as exc:  # disk full, quota, a folder gone: bad environment, not a bug
        raise UsageError(f"{target}: cannot write ({exc.strerror or exc}); nothing written") from None
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


def write_target(target: str | os.PathLike) -> Path:
    """The file a write to ``target`` lands in.  A symlink is followed: the file it points at is
    replaced and the link stays (an atomic rename onto the link itself would replace the link).  A
    target that exists and is no regular file — a device such as ``/dev/stdout``, a FIFO, a socket —
    is refused: a model is written to a file (the rename would put a file in the device's place)."""
    path = Path(target)
    try:
        st = os.stat(path)  # follows links
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{target}: not a regular file (a device, FIFO or socket); give a file path")
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_writable(target: str | os.PathLike) -> None:
    """Refuse, before any work, a target that cannot be written: a directory, a missing folder,
    a folder without write permission, a device."""
    target = write_target(target)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"{target}: is a directory; give a file name")
    if not folder.is_dir():
        raise UsageError(f"{target}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{target}: cannot write in {str(folder)!r} (permission denied)")


def external_data_name(target: str | os.PathLike) -> str:
    """The external data file written beside ``target``: ``<target name>.data``."""
    return f"{Path(target).name}.data"


def _refuse_overwriting_inputs(target: Path, data_file: Path | None, source) -> None:
    """Never clobber a file the input model is made of, unless writing over the model itself
    (``--in-place``, where its own data file is meant to be replaced too)."""
    if source is None:
        return
    inputs = list(getattr(source, "external_files", ()) or ())
    in_place = getattr(source, "path", None) is not None and same_file(target, source.path)
    for f in inputs:
        if same_file(target, f):
            raise UsageError(f"{target}: is the external data file of the input model {source.label}; "
                             "choose another output")
        if data_file is not None and not in_place and same_file(data_file, f):
            raise UsageError(f"{target}: its external data {data_file.name} would overwrite the input model's "
                             f"external data ({f}); choose another output")


def _in_place_data_file(target: Path, source) -> str | None:
    """Writing a model over itself (``--in-place``) whose weights sit in one data file beside it: that
    file's name, so the new data replaces the old instead of leaving it behind."""
    path = getattr(source, "path", None)
    files = list(getattr(source, "external_files", ()) or ())
    if path is None or len(files) != 1 or not same_file(target, path):
        return None
    folder = target.parent if str(target.parent) else Path(".")
    data = Path(files[0])
    return data.name if same_file(data.parent, folder) else None


EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the external data file


def save_model(model, target: str | os.PathLike, *, external: bool | None = None, source=None) -> None:
    """Write ``model`` atomically so that the onnxruntime sepify depends on can load it.

    The IR version is clamped to what that onnxruntime accepts.  ``external=None`` means "only if
    needed" (the proto is over protobuf's 2 GiB limit); with external data every tensor of at
    least ``EXTERNAL_THRESHOLD`` bytes goes to ``<target name>.data`` beside the model, one after
    the other in graph order (so equal models give equal bytes).  Both files are written in a
    temporary folder next to ``target`` and moved into place only when complete; nothing is left
    behind on failure.  ``source`` (the :class:`~sepify.load.LoadedModel` the model came from)
    guards the input's files: neither ``target`` nor its data file may overwrite the input's
    external data unless ``target`` is the input model itself (in place).

    The proto is modified: IR version clamped; when saving externally its weights are moved out
    to the data file one by one (so the whole model is never held twice) and it then refers to it.
    Weights of a memory-mapped model (still in the input's data file) are streamed across.
    """
    import shutil

    import onnx

    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    check_writable(target)
    model.ir_version = min(model.ir_version, ort_max_ir_version())
    still_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_all_tensors(model, sparse=False))
    serialized = None
    if external is None:
        if still_external:
            external = True
        elif _declared_bytes(model) < PROTOBUF_LIMIT // 2:
            # Surely under the limit: serialize once and measure that (ByteSize encodes the whole
            # proto to size it, 50 ms for a 45 MB model, and the write then encoded it again).
            serialized = _serialize_within_limit(model)
            external = serialized is None
        else:
            external = model.ByteSize() > PROTOBUF_LIMIT
    data_name = external_data_name(target)
    own = _in_place_data_file(target, source)
    if own is not None:
        data_name = own  # in place: the model keeps its data file's name (none is left behind)
    _refuse_overwriting_inputs(target, folder / data_name if external else None, source)
    if not external:
        if still_external:
            _materialize_external(model)
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(model.SerializeToString() if serialized is None else serialized)
        return
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise UsageError(f"{target}: cannot write here ({exc.strerror or exc})") from None
    try:
        wrote_data = _write_external(model, staging / data_name, data_name)
        with open(staging / target.name, "wb") as fh:
            fh.write(model.SerializeToString())
        mode = _mode_for(target)
        for name in ([data_name] if wrote_data else []) + [target.name]:
            os.chmod(staging / name, mode)
        if wrote_data:
            os.replace(staging / data_name, folder / data_name)
        os.replace(staging / target.name, target)
    except OSError as exc:
        raise UsageError(f"{target}: cannot write ({exc.strerror or exc}); nothing written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _declared_bytes(model) -> int:
    """The bytes the model's tensors declare by their dims (read without touching their data)."""
    return sum(max(0, tensor_nbytes(t) or 0) for t in iter_all_tensors(model))


def _serialize_within_limit(model) -> bytes | None:
    """The serialized model, or None when it does not fit one protobuf message (its graph alone
    can be that large: huge string attributes)."""
    try:
        data = model.SerializeToString()
    except (ValueError, MemoryError):  # protobuf refuses messages over its limit
        return None
    return data if len(data) <= PROTOBUF_LIMIT else None


def _mode_for(target: Path) -> int:
    """The mode a plain open() would give a new file (or the existing file's own)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


STREAM_CHUNK = 64 << 20  # bytes copied at a time from an input data file to the output's


def _write_external(model, data_path: Path, location: str) -> bool:
    """Move every tensor of at least ``EXTERNAL_THRESHOLD`` bytes into ``data_path`` (each at a 4 KiB
    aligned offset, as onnx does), pointing the tensor at ``location``.

    Tensors held in the proto are written and dropped from it one by one, so memory falls as the
    file grows.  Tensors still in an input's data file (a memory-mapped model, see
    :func:`sepify.load.load_model`) are copied over in ``STREAM_CHUNK`` pieces, never loaded
    whole; small ones are inlined, as they would have been had they been loaded.  Either way the
    bytes written are the same, so equal models give equal files.  Returns whether anything was
    written.
    """
    import onnx

    from .load import read_external_bytes

    offset = 0
    with open(data_path, "wb") as fh:
        for tensor in iter_all_tensors(model, sparse=False):
            source = None
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(tensor)
                if not os.path.isabs(info.location):
                    raise ValueError(f"tensor {tensor.name!r} refers to unresolved external data {info.location!r}")
                length = int(info.length) if info.length else os.path.getsize(info.location) - int(info.offset or 0)
                if length < EXTERNAL_THRESHOLD:
                    tensor.raw_data = read_external_bytes(tensor)
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
                    continue
                source = (info.location, int(info.offset or 0), length)
            elif not tensor.HasField("raw_data"):
                continue
            else:
                data = tensor.raw_data
                length = len(data)
                if length < EXTERNAL_THRESHOLD:
                    continue
            pad = -offset % 4096
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            if source is None:
                fh.write(data)
                del data
                tensor.ClearField("raw_data")
            else:
                _copy_range(source, fh)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += length
    if offset == 0:
        data_path.unlink()
        return False
    return True


def _copy_range(source: tuple[str, int, int], out) -> None:
    path, offset, length = source
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left:
            chunk = fh.read(min(STREAM_CHUNK, left))
            if not chunk:
                raise OSError(f"{path}: ended {left} bytes early")
            out.write(chunk)
            left -= len(chunk)


def _materialize_external(model) -> None:
    """Read every tensor still in an input's data file into the proto (for a single-file save)."""
    import onnx

    from .load import read_external_bytes

    for tensor in iter_all_tensors(model, sparse=False):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.raw_data = read_external_bytes(tensor)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
