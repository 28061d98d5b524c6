"""Orbax checkpoints of a training run, and a SIGTERM / SIGINT (preemption, Ctrl-C) guard.

A checkpoint step directory holds two items:

- ``state``: the array pytree (parameters, optimizer state, rng key, step
  counters), saved asynchronously and restored straight onto the shardings of
  a target pytree;
- ``meta``: JSON with the step, the data-iterator state (grain's
  ``get_state()``), the run config and free-form extras.

Orbax writes each step into a temporary directory and renames it when the
write is complete (atomic), so a run killed mid-save leaves the previous step
as the latest; its temporary directories are never listed as steps. A step
damaged afterwards (a truncated file, a lost item) fails to restore with a
`CheckpointError` naming it; `move_aside` renames it out of the step list so
that a run can resume from the step before it.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

from jaxsql.errors import JaxsqlError


class CheckpointError(JaxsqlError):
    """A checkpoint directory that is missing, incomplete or does not match the run."""


def _encode_data_state(state: Any) -> Any:
    # grain iterators return bytes (JSON) or a dict depending on the iterator kind.
    if isinstance(state, bytes):
        return {"__bytes_b64__": base64.b64encode(state).decode("ascii")}
    return state


def _decode_data_state(state: Any) -> Any:
    if isinstance(state, Mapping) and "__bytes_b64__" in state:
        return base64.b64decode(state["__bytes_b64__"])
    return state


class Checkpointer:
    """Keep-last-N, async, atomic orbax checkpoints of one run directory.

    Args:
      directory: where step directories ``<dir>/<step>/`` are written.
      max_to_keep: how many most recent steps to keep.
      async_save: write arrays in a background thread (``wait()`` to finish).
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        from jaxsql.paths import as_path, is_remote

        self._ocp = ocp
        # a bucket (gs://) goes to orbax as an etils.epath.Path, the filesystem layer it writes through
        self.directory = as_path(directory) if is_remote(directory) else Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Any = None,
        config: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Start saving `state` (array pytree) and the JSON metadata as `step`.

        Returns False when the step already exists (nothing is overwritten).
        """
        if step in self._manager.all_steps():
            return False
        meta = {
            "step": int(step),
            "data_state": _encode_data_state(data_state),
            "config": dict(config or {}),
            "extra": dict(extra or {}),
        }
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state),
            meta=self._ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def all_steps(self) -> list[int]:
        """Completed (committed) steps, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The most recent completed step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``(state, meta)`` of `step` (default: latest) onto `target_state`'s
        structure, dtypes and shardings; ``meta["data_state"]`` is as saved."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no completed checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(
                f"checkpoint step {step} not found in {self.directory}; have {self.all_steps()}"
            )
        step_dir = self.directory / str(step)
        for item in ("state", "meta"):
            if not (step_dir / item).is_dir():
                raise CheckpointError(
                    f"checkpoint {step_dir} is incomplete: item {item!r} is missing"
                )
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(target_state),
            meta=self._ocp.args.JsonRestore(),
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax raises many kinds; name the directory once
            detail = " ".join(str(e).split())[:300]  # one line
            raise CheckpointError(
                f"checkpoint {step_dir} cannot be restored (corrupt, incomplete or from a "
                f"different model/optimizer): {type(e).__name__}: {detail}"
            ) from e
        meta = dict(restored["meta"])
        meta["data_state"] = _decode_data_state(meta.get("data_state"))
        return restored["state"], meta

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON metadata of `step` (default latest), without arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no completed checkpoint in {self.directory}")
        restored = self._manager.restore(
            step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
        )
        meta = dict(restored["meta"])
        meta["data_state"] = _decode_data_state(meta.get("data_state"))
        return meta

    def move_aside(self, step: int) -> Path:
        """Rename step `step` to ``<step>.damaged`` (kept for inspection, no longer a step).

        On several processes every process calls this; the lead renames, the others wait.
        """
        from jaxsql import distributed

        src = self.directory / str(step)
        dst = src.with_name(f"{step}.damaged")
        n = 1
        while dst.exists():
            n += 1
            dst = src.with_name(f"{step}.damaged{n}")
        if distributed.is_lead_process():
            src.rename(dst)
        distributed.sync(f"checkpoint-move-aside-{step}")
        self._manager.reload()
        return dst

    def wait(self) -> None:
        """Block until any async save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionGuard:
    """Turns SIGTERM (TPU preemption, ``kill``) and SIGINT (Ctrl-C) into a request checked
    at safe points.

    The training loop calls `stop_requested` after each step; when True it saves
    a checkpoint and exits cleanly. A second signal restores the default
    action so a stuck process can still be killed. Use as a context manager.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = signals
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self._event.is_set():  # asked twice: stop waiting for a safe point
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._event.set()

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def request_stop(self) -> None:
        """Ask for a save-and-exit as if SIGTERM had arrived."""
        self._event.set()

    def stop_requested(self) -> bool:
        """True once a stop has been requested."""
        return self._event.is_set()
