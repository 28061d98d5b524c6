"""Training metrics: JSONL lines, TensorBoard scalars, and a live progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping


def _scalar(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


class MetricsWriter:
    """Append one JSON line per step to ``<dir>/metrics.jsonl`` and, if asked,
    write the same scalars to TensorBoard (tensorboardX) under ``<dir>/tb``.

    Non-finite values are written as JSON null (and skipped in TensorBoard),
    so the JSONL stays strict JSON.
    """

    def __init__(self, directory: str | Path, *, tensorboard: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.directory / "tb"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (name -> number) for `step`."""
        row: dict[str, Any] = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            f = _scalar(v)
            row[k] = f if f is not None and math.isfinite(f) else None
            if self._tb is not None and row[k] is not None:
                self._tb.add_scalar(k, row[k], int(step))
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Flush and close the files."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics JSONL file."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class ProgressBar:
    """A tqdm bar over training steps showing the live reward (and any other keys)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True,
                 show: tuple[str, ...] = ("reward/mean", "loss")):
        from tqdm import tqdm

        self._show = show
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                         dynamic_ncols=True)

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Advance one step and show the chosen metrics."""
        post = {}
        for k in self._show:
            f = _scalar(metrics.get(k))
            if f is not None:
                post[k.split("/")[0] if k.endswith("/mean") else k] = f"{f:.3f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()
