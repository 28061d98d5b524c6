"""Training metrics: JSONL lines, TensorBoard scalars, and a live progress bar.

One writer (`MetricsWriter`) and one bar (`ProgressBar`) serve every
trainer and the demo; `rl.loop` drives both from its hooks, on the lead
process only.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping


def _scalar(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


class MetricsWriter:
    """Append one JSON line per step to ``<dir>/metrics.jsonl`` and, if asked,
    write the same scalars to TensorBoard (tensorboardX) under ``<dir>/tb``
    (or `tensorboard_dir`).

    Rows written with a `phase` (the demo: ``sft``, ``rl``, ``eval``) carry a
    ``phase`` key and their TensorBoard tags are ``phase/name``. Non-finite
    values are written as JSON null (and skipped in TensorBoard), so the JSONL
    stays strict JSON.
    """

    def __init__(self, directory: str | Path, *, tensorboard: bool = True,
                 tensorboard_dir: str | Path | None = None):
        from jaxsql.paths import as_path, open_append, register_tensorboard_urls

        self.directory = as_path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        # in a bucket (gs://) objects cannot be appended to: the file is rewritten at each row
        self._file = open_append(self.path)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = os.fspath(tensorboard_dir or self.directory / "tb")
            register_tensorboard_urls(tb_dir)
            self._tb = SummaryWriter(tb_dir)

    def write(self, step: int, metrics: Mapping[str, Any], phase: str | None = None) -> None:
        """Record `metrics` (name -> number) for `step` (of `phase`, if given)."""
        row: dict[str, Any] = {"step": int(step), "time": time.time()}
        if phase is not None:
            row["phase"] = phase
        for k, v in metrics.items():
            f = _scalar(v)
            row[k] = f if f is not None and math.isfinite(f) else None
            if self._tb is not None and row[k] is not None:
                self._tb.add_scalar(f"{phase}/{k}" if phase else k, row[k], int(step))
        self._file.write(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path, phase: str | None = None) -> list[dict[str, Any]]:
    """All rows of a metrics JSONL file (of one `phase`, if given)."""
    from jaxsql.paths import as_path

    p = as_path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in rows if phase is None or r.get("phase") == phase]


def clock(seconds: float) -> str:
    """``m:ss`` of a duration (negative durations show as 0:00)."""
    s = max(0, int(seconds))
    return f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    """A tqdm bar over training steps showing live metrics (and the time left of a budget)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True,
                 show: tuple[str, ...] = ("reward/mean", "loss"),
                 time_left: Callable[[], float] | None = None):
        import sys

        from tqdm import tqdm

        self._show = show
        self._time_left = time_left
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                         dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Advance one step and show the chosen metrics."""
        post = {}
        for k in self._show:
            f = _scalar(metrics.get(k))
            if f is not None:
                post[k.split("/")[0] if k.endswith("/mean") else k.split("/")[-1]] = f"{f:.3f}"
        if self._time_left is not None:
            post["left"] = clock(self._time_left())
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def write(self, line: str) -> None:
        """Print `line` above the bar without breaking it."""
        self._bar.write(line)

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()
