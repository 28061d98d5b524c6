"""Local and cloud paths (``gs://bucket/...``) through one filesystem layer: `etils.epath`.

Pod users keep run directories, checkpoints, HF checkpoints and recipes in a
bucket. Orbax writes checkpoints through `etils.epath` (its array data through
TensorStore's own GCS driver); everything else a run reads or writes goes
through the same `epath.Path` here, so there is one filesystem layer and no
client of our own. `epath` reaches ``gs://`` through `fsspec` (``gcsfs``, the
``jaxsql[gcs]`` extra) or TensorFlow's ``gfile`` when TensorFlow is installed.

- `as_path`: a `pathlib.Path` for a local path (unchanged behaviour), an
  `epath.Path` for a URL (``gs://``, ``s3://``, ...).
- `local_dir` / `upload_dir`: a remote directory staged to local disk (HF
  checkpoints and tokenizers: `transformers` and the safetensors reader open
  local files) and a local directory written back to a bucket.
- `require_local`: SQLite databases stay on local disk
  (``tpu_scripts/stage_data.sh`` copies them to every worker); a URL there is
  one clear error that says so.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence, Union

from jaxsql.errors import JaxsqlError

AnyPath = Union[Path, Any]  # pathlib.Path or etils.epath.Path
_STAGED: set[Path] = set()  # local copies of bucket directories made by this process


def is_remote(path: Any) -> bool:
    """Whether `path` is a URL (``gs://...``) rather than a local path."""
    return "://" in os.fspath(path) if isinstance(path, (str, os.PathLike)) else False


def as_path(path: Any) -> AnyPath:
    """A `pathlib.Path` for a local path, an `etils.epath.Path` for a URL."""
    if is_remote(path):
        from etils import epath

        try:
            return epath.Path(os.fspath(path))
        except Exception as e:  # an unknown scheme or a missing backend
            raise JaxsqlError(f"{path}: cannot open this URL ({type(e).__name__}: {e})") from None
    return Path(path)


def require_local(path: Any, what: str) -> Path:
    """`path` as a local `Path`; a URL is one error naming `what` (SQLite databases stay local)."""
    if is_remote(path):
        raise JaxsqlError(f"{what} {path}: SQLite databases stay on local disk (SQLite cannot open a bucket); "
                          f"copy them to every worker with tpu_scripts/stage_data.sh and give the local path")
    return Path(path)


def _cache_root() -> Path:
    root = os.environ.get("JAXSQL_CACHE") or os.path.join(tempfile.gettempdir(), f"jaxsql-cache-{os.getuid()}")
    return Path(root)


def local_dir(path: Any, what: str = "directory", only: Sequence[str] | None = None) -> Path:
    """A local directory with the files of `path`: `path` itself when local; a remote directory
    copied (top-level files only, what HF checkpoints and tokenizers hold; with `only`, just
    the files of those names, e.g. a tokenizer without the weights) into a directory of this
    process under `_cache_root` (removed when the process exits), fetched again on every call
    so a changed bucket is never read stale."""
    if not is_remote(path):
        return Path(path)
    src = as_path(path)
    try:
        if not src.is_dir():
            raise JaxsqlError(f"{what} {path}: not found (no such directory in the bucket)")
        files = [p for p in src.iterdir() if (only is None or p.name in only) and not p.is_dir()]
    except JaxsqlError:
        raise
    except Exception as e:  # the backend's own errors (permissions, network)
        raise JaxsqlError(f"{what} {path}: cannot list it ({type(e).__name__}: {e})") from None
    key = hashlib.sha256((os.fspath(path).rstrip("/") + repr(sorted(only or ()))).encode()).hexdigest()[:16]
    dst = _cache_root() / f"{key}-{os.getpid()}"  # per process: processes sharing a host never race
    if dst not in _STAGED:
        _STAGED.add(dst)
        atexit.register(shutil.rmtree, dst, True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=_ensure(_cache_root())))
    try:
        for f in files:
            with f.open("rb") as r, open(tmp / f.name, "wb") as w:
                shutil.copyfileobj(r, w, 16 << 20)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _ensure(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def upload_dir(local: Path, remote: Any) -> None:
    """Copy the top-level files of the local directory `local` into `remote` (created)."""
    dst = as_path(remote)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(local).iterdir()):
        if f.is_file():
            with open(f, "rb") as r, (dst / f.name).open("wb") as w:
                shutil.copyfileobj(r, w, 16 << 20)


def read_text(path: Any) -> str:
    """The text of a local or remote file."""
    return as_path(path).read_text()


class RewrittenFile:
    """A growing file on an object store, where objects cannot be appended to: its whole content
    is kept in memory and the object rewritten on every `flush` (metrics, TensorBoard events; a
    run's metrics are a few hundred bytes a step). `append` starts from the existing object."""

    def __init__(self, path: Any, *, append: bool, binary: bool = False):
        self.path = as_path(path)
        self._binary = binary
        self._parts: list[Any] = []
        if append and self.path.exists():
            self._parts.append(self.path.read_bytes() if binary else self.path.read_text())
        self._dirty = True
        self.closed = False

    def write(self, data: Any) -> int:
        self._parts.append(data)
        self._dirty = True
        return len(data)

    def flush(self) -> None:
        if not self._dirty:
            return
        joined = (b"" if self._binary else "").join(self._parts)
        self._parts = [joined]
        if self._binary:
            self.path.write_bytes(joined)
        else:
            self.path.write_text(joined)
        self._dirty = False

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


def open_append(path: Any):
    """A text file open for appending lines: the file itself on local disk, a `RewrittenFile`
    in a bucket (whose `flush` rewrites the object). Call `flush` after each line to make it
    visible, `close` at the end."""
    path = as_path(path)
    return RewrittenFile(path, append=True) if is_remote(path) else open(path, "a", encoding="utf-8")


class _EpathEventFiles:
    """tensorboardX writer factory for URLs: event files as `RewrittenFile`s through `epath`."""

    def open(self, path: str) -> RewrittenFile:
        return RewrittenFile(path, append=False, binary=True)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard_urls(path: Any) -> None:
    """Make tensorboardX write event files under the URL `path` through `epath` (its own GCS
    writer would be a second client with its own credentials)."""
    if not is_remote(path):
        return
    from tensorboardX import record_writer

    scheme = os.fspath(path).split("://", 1)[0]
    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _EpathEventFiles):
        record_writer.register_writer_factory(scheme, _EpathEventFiles())


def whole_lines(path: Any) -> bytes:
    """The bytes of the local or remote file `path` up to its last newline (b"" when it does
    not exist). A last line cut off mid-write (a crash) is cut from the file too: truncated
    on local disk, the object rewritten in a bucket, so appending continues on a clean line."""
    path = as_path(path)
    if not path.exists():
        return b""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        if is_remote(path):
            path.write_bytes(data[:keep])
        else:
            with open(path, "r+b") as f:
                f.truncate(keep)
    return data[:keep]


class LineAppender:
    """Appends text to a local or remote file, durable at each `append`: on local disk an
    append, flush and fsync; in a bucket, where objects cannot be appended to, a
    `RewrittenFile` (the object rewritten whole, starting from its existing content)."""

    def __init__(self, path: Any):
        self.path = as_path(path)
        self._remote = RewrittenFile(self.path, append=True) if is_remote(self.path) else None

    def append(self, text: str) -> None:
        if self._remote is not None:
            self._remote.write(text)
            self._remote.flush()
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
