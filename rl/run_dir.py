"""A run directory that cannot be silently damaged: checked, locked, and only ours.

Every trainer claims its ``run_dir`` through `RunDir.claim` before it writes
anything:

- a path that exists and is not a directory, or that cannot be created or
  written (read-only file system, no permission), is a one-line error;
- a directory holding anything but what a jaxsql run writes (`RUN_ENTRIES`)
  is refused, nothing written: someone else's files are never trained into;
  an ``hf/`` that is not a jaxsql export is refused at start, not after
  training, since the final export would refuse to overwrite it;
- the lead process takes an exclusive `fcntl.flock` on ``run_dir/run.lock``
  holding its pid: a second trainer on the same directory fails at once
  naming that pid. The kernel drops the lock when its process dies, so the
  lock of a killed run is taken over by the next one (the file's old pid is
  just overwritten).
- a run directory in a bucket (``gs://...``, `jaxsql.paths`) has no flock: the
  lead process holds a **lease** instead, ``run.lock`` holding JSON (host,
  pid, a random token, the holder's clock at its last renewal) renewed every
  `LEASE_RENEW_S` seconds by a background thread and deleted on release. A
  second trainer finding a lease renewed less than `LEASE_EXPIRY_S` ago fails
  at once naming its host and pid (the same refusal as the flock); a lease
  older than that (its run was killed) is taken over. Two trainers starting
  within the same second can both write the lease; each re-reads it after
  writing and the one whose token is not there refuses, so at most one goes
  on. Hosts' clocks must agree to well within `LEASE_EXPIRY_S`.

`check_tokenizer` refuses a tokenizer that cannot belong to the model (more
tokens than the model's vocabulary) or that is empty (what `transformers`
returns for a directory whose tokenizer files were removed).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from jaxsql.errors import JaxsqlError
from jaxsql.paths import as_path, is_remote

LOCK_NAME = "run.lock"
LEASE_RENEW_S = 60.0  # how often the holder of a bucket run directory's lease renews it
LEASE_EXPIRY_S = 300.0  # a lease not renewed for this long belonged to a killed run: taken over
# What a run writes into its directory (trainers, the synthetic data default, the HF export).
RUN_ENTRIES = frozenset({"checkpoints", "metrics.jsonl", "tb", "samples.jsonl", "hf", "synthetic", LOCK_NAME})


class RunDirError(JaxsqlError):
    """A run directory that cannot be used (foreign, locked, read-only, not a directory)."""


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def prepare_output_dir(path, what: str):
    """Create `path` (and parents; local or ``gs://``) or fail in one line naming `what` and the reason."""
    path = as_path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{what} {path}: cannot create it ({_reason(e)})") from None
    return path


class RunDir:
    """A claimed run directory (use `claim`); `release` (or the context manager) lets it go."""

    def __init__(self, path, lock_fd: int | None, lease: "_Lease | None" = None):
        self.path = path
        self._fd = lock_fd
        self._lease = lease

    @classmethod
    def claim(cls, path: str | Path, *, lock: bool = True, expect_hf_export: bool = False) -> "RunDir":
        """Check, create and lock `path` as a run directory (see the module docstring).

        Args:
          path: the run directory.
          lock: take the directory lock (the lead process of a multi-host run).
          expect_hf_export: the run will export to ``hf/``; a foreign ``hf/`` is refused now.
        """
        path = as_path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run_dir {path}: exists and is not a directory")
        if path.is_dir():
            foreign = sorted(p.name for p in path.iterdir() if p.name not in RUN_ENTRIES)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise RunDirError(f"run_dir {path} holds files that are not a jaxsql run's ({shown}); "
                                  f"choose an empty or new run_dir (nothing was written)")
            _check_hf_dir(path / "hf", expect_hf_export)
        prepare_output_dir(path, "run_dir")
        if is_remote(path):
            return cls(path, None, _Lease.take(path / LOCK_NAME) if lock else None)
        fd = _lock(path / LOCK_NAME) if lock else None
        return cls(path, fd)

    def release(self) -> None:
        """Drop the lock (the file stays; a later run takes it over), or end the lease (its file
        is deleted)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _check_hf_dir(hf: Path, expect_export: bool) -> None:
    if not expect_export or not hf.exists():
        return
    from models.hf_io import EXPORT_MARKER

    if not hf.is_dir():
        raise RunDirError(f"{hf}: exists and is not a directory; the run's HF export would fail after "
                          f"training (remove it or set checkpoint.export_hf=false)")
    if any(hf.iterdir()) and not (hf / EXPORT_MARKER).exists():
        raise RunDirError(f"{hf} holds files that are not a jaxsql export; the run's HF export would refuse "
                          f"to overwrite them after training (move them or set checkpoint.export_hf=false)")


def _lock(lock_path: Path) -> int:
    import fcntl

    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"run_dir {lock_path.parent}: cannot write in it ({_reason(e)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"run_dir {lock_path.parent} is in use by another jaxsql process (pid {holder}); "
                              f"wait for it to finish or choose another run_dir") from None
        raise RunDirError(f"run_dir {lock_path.parent}: cannot lock {lock_path.name} ({_reason(e)})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise RunDirError(f"run_dir {lock_path.parent}: cannot write in it ({_reason(e)})") from None
    return fd


class _Lease:
    """The lease on a bucket run directory (module docstring): take, renew in a thread, release."""

    def __init__(self, path, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="jaxsql-run-lease")

    @staticmethod
    def _read(path) -> dict | None:
        try:
            d = json.loads(path.read_text())
            return d if isinstance(d, dict) else {}
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # unreadable: treated as held (renewed now) unless it stays so past the expiry

    def _write(self) -> None:
        body = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "renewed": time.time()}
        self.path.write_text(json.dumps(body))

    @classmethod
    def take(cls, path) -> "_Lease":
        run_dir = path.parent
        held = cls._read(path)
        if held is not None:
            age = time.time() - float(held.get("renewed", time.time()))
            if age < LEASE_EXPIRY_S:
                raise RunDirError(f"run_dir {run_dir} is in use by another jaxsql process (pid {held.get('pid', '?')} "
                                  f"on {held.get('host', '?')}, lease renewed {max(age, 0):.0f} s ago); wait for it "
                                  f"to finish or choose another run_dir (a lease not renewed for "
                                  f"{LEASE_EXPIRY_S:.0f} s is taken over)")
        lease = cls(path, uuid.uuid4().hex)
        try:
            lease._write()
            time.sleep(0.2)  # a concurrent taker's write lands in between: read back who holds it
            now = cls._read(path) or {}
        except OSError as e:
            raise RunDirError(f"run_dir {run_dir}: cannot write its lease {path.name} ({_reason(e)})") from None
        if now.get("token") != lease.token:
            raise RunDirError(f"run_dir {run_dir} is in use by another jaxsql process (pid {now.get('pid', '?')} on "
                              f"{now.get('host', '?')}, which took the lease at the same time); choose another run_dir")
        lease._thread.start()
        return lease

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                if (self._read(self.path) or {}).get("token") != self.token:
                    return  # taken over (this process was stalled past the expiry): stop claiming it
                self._write()
            except OSError:
                continue  # a transient bucket error: retry at the next renewal

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            if (self._read(self.path) or {}).get("token") == self.token:
                self.path.unlink()
        except OSError:
            pass  # the lease expires on its own


def check_tokenizer(tokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer that is empty or larger than the model's vocabulary `vocab_size`."""
    probe = tokenizer("SELECT name FROM t WHERE id = 1", add_special_tokens=False)["input_ids"]
    if len(tokenizer) <= 1 or not probe:
        raise JaxsqlError(f"the tokenizer loaded from {where} is empty (no vocabulary: were its files "
                          f"removed?); point model.tokenizer at the run's tokenizer directory")
    if len(tokenizer) > vocab_size:
        raise JaxsqlError(f"the tokenizer from {where} has {len(tokenizer)} tokens but the model's vocabulary "
                          f"has {vocab_size}: they do not belong together (ids past the vocabulary would "
                          f"train on garbage)")
