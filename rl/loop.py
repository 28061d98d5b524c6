"""The one training loop: a generator of steps, and hooks that do everything else.

Every trainer (GRPO, SFT, and the PRM trainer to come) runs through
`TrainLoop`; the demo's phases too. A trainer is a `Trainable`: its state,
its step function (``step(step) -> metrics``) and what it saves
(``save(step)``, ``wait_for_saves()``). The loop owns the rest through hooks:

- `SaveEvery`: a checkpoint every N steps;
- `StopOnSignal`: SIGTERM (preemption) and SIGINT (Ctrl-C) finish the current
  step, save and stop (`jaxsql.checkpoint.PreemptionGuard`);
- `Budget`: a wall-clock deadline; the loop stops (and saves) once it passes;
- `Evaluate`: a callback every N steps (the demo's dev evaluation);
- `LogMetrics`: the step's metrics through the one `jaxsql.metrics.MetricsWriter`;
- `ShowProgress`: the one `jaxsql.metrics.ProgressBar`.

The caller drives: ``for info in loop.steps(): ...`` yields a `StepInfo`
after each step (levanter's ``training_steps``); ``loop.run()`` drains it and
returns a `RunResult`. When the loop ends without an exception (all steps
done, a signal, the budget) it saves the final step and waits for pending
saves; an exception ends it without saving, like a crash, and the last
periodic checkpoint is where ``--resume`` continues.

Multi-host: every process runs the same loop. A stop (signal, budget) is
decided from `jaxsql.distributed.any_process`, so all processes make the same
number of device calls; files (metrics, TensorBoard, progress) are written
only where `jaxsql.distributed.is_lead_process()` is true.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Generator, Mapping, Protocol, Sequence

from jaxsql.checkpoint import PreemptionGuard
from jaxsql.distributed import any_process, is_lead_process
from jaxsql.metrics import MetricsWriter, ProgressBar


class Trainable(Protocol):
    """What a trainer gives the loop."""

    start_step: int

    def step(self, step: int) -> dict[str, float]:
        """Run step `step` (0-based: the number of steps done before it); its metrics."""

    def save(self, step: int) -> bool:
        """Checkpoint the run after `step` completed steps."""

    def wait_for_saves(self) -> None:
        """Block until every checkpoint started is written."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One finished step: `step` steps are done (the checkpoint numbering)."""

    step: int
    metrics: Mapping[str, float]
    seconds: float


@dataclasses.dataclass(frozen=True)
class RunResult:
    """How a loop ended.

    Attributes:
      step: steps completed (including those of earlier sessions).
      stop_reason: None (reached the last step), "signal" or "budget".
      history: metrics of the steps run in this session.
      start_step: where this session started.
    """

    step: int
    stop_reason: str | None
    history: list[dict[str, float]]
    start_step: int

    @property
    def stopped_by_signal(self) -> bool:
        return self.stop_reason == "signal"


class Hook:
    """Called around the steps of a `TrainLoop`; subclasses override what they need."""

    def on_start(self, loop: "TrainLoop") -> None:
        """Before the first step (may already ask to stop)."""

    def after_step(self, loop: "TrainLoop", info: StepInfo) -> None:
        """After each step (may ask to stop with ``loop.request_stop``)."""

    def on_end(self, loop: "TrainLoop", result: RunResult) -> None:
        """After the final save, when the loop ended without an exception."""

    def close(self) -> None:
        """Release what the hook holds (always called)."""


class TrainLoop:
    """Drive `trainer` from its ``start_step`` to `total_steps` (or `until`, if smaller).

    Args:
      trainer: a `Trainable`.
      total_steps: the run's length (progress, the last metrics line).
      hooks: `Hook`s, called in order.
      until: end this session at step `until` (a partial session that ends with a checkpoint).
    """

    def __init__(self, trainer: Trainable, total_steps: int, hooks: Sequence[Hook] = (), until: int | None = None):
        self.trainer = trainer
        self.total_steps = total_steps
        self.last_step = total_steps if until is None else min(until, total_steps)
        self.hooks = list(hooks)
        self._stop: str | None = None
        self.result: RunResult | None = None

    def request_stop(self, reason: str) -> None:
        """Stop after the current step (the first reason asked wins)."""
        if self._stop is None:
            self._stop = reason

    def _should_stop(self) -> bool:
        # Taken from every process's flag, so all processes stop after the same step.
        if any_process(self._stop is not None):
            if self._stop is None:  # asked on another process (its signal or its clock)
                self._stop = "signal"
            return True
        return False

    def steps(self) -> Generator[StepInfo, None, RunResult]:
        """Yield a `StepInfo` after each step; returns the `RunResult` (also ``self.result``)."""
        step = start = self.trainer.start_step
        history: list[dict[str, float]] = []
        try:
            for h in self.hooks:
                h.on_start(self)
            while step < self.last_step and not self._should_stop():
                t0 = time.perf_counter()
                metrics = self.trainer.step(step)
                step += 1
                history.append(metrics)
                info = StepInfo(step, metrics, time.perf_counter() - t0)
                for h in self.hooks:
                    h.after_step(self, info)
                yield info
            self.trainer.save(step)
            self.trainer.wait_for_saves()
            self.result = RunResult(step, self._stop, history, start)
            for h in self.hooks:
                h.on_end(self, self.result)
            return self.result
        finally:
            for h in self.hooks:
                h.close()

    def run(self) -> RunResult:
        """Run all steps; the `RunResult`."""
        for _ in self.steps():
            pass
        assert self.result is not None
        return self.result


# --- hooks ------------------------------------------------------------------------------------


class SaveEvery(Hook):
    """A checkpoint every `every` steps (0: none besides the loop's final one)."""

    def __init__(self, every: int):
        self.every = every

    def after_step(self, loop: TrainLoop, info: StepInfo) -> None:
        if self.every and info.step % self.every == 0 and info.step < loop.last_step:
            loop.trainer.save(info.step)


class StopOnSignal(Hook):
    """SIGTERM and SIGINT: finish the step, save, stop. A second signal kills at once."""

    def __init__(self):
        self._guard = PreemptionGuard()
        self._entered = False

    def on_start(self, loop: TrainLoop) -> None:
        self._guard.__enter__()
        self._entered = True

    def after_step(self, loop: TrainLoop, info: StepInfo) -> None:
        if self._guard.stop_requested():
            loop.request_stop("signal")

    def close(self) -> None:
        if self._entered:
            self._guard.__exit__(None, None, None)
            self._entered = False


class Budget(Hook):
    """Stop once the wall clock passes `deadline` (a `time.time()` value), checked before the
    first step and after each one."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def _check(self, loop: TrainLoop) -> None:
        if time.time() >= self.deadline:
            loop.request_stop("budget")

    def on_start(self, loop: TrainLoop) -> None:
        self._check(loop)

    def after_step(self, loop: TrainLoop, info: StepInfo) -> None:
        self._check(loop)


class LogMetrics(Hook):
    """Write each `every`-th step's metrics (and the last step's) through `writer`.

    `keys` limits the names written (None: all); `phase` tags the rows (the demo);
    `close_writer`: the hook owns the writer and closes it at the end.
    """

    def __init__(self, writer: MetricsWriter | None, every: int = 1, phase: str | None = None,
                 keys: Sequence[str] | None = None, close_writer: bool = False):
        self.writer = writer if is_lead_process() else None
        self.every, self.phase, self.keys, self.close_writer = every, phase, keys, close_writer

    def close(self) -> None:
        if self.close_writer and self.writer is not None:
            self.writer.close()

    def after_step(self, loop: TrainLoop, info: StepInfo) -> None:
        if self.writer is None or not (info.step % self.every == 0 or info.step == loop.last_step):
            return
        m = info.metrics if self.keys is None else {k: info.metrics[k] for k in self.keys if k in info.metrics}
        self.writer.write(info.step, m, phase=self.phase)


class ShowProgress(Hook):
    """The progress bar (lead process only) with the metrics `show` and the budget left, if any."""

    def __init__(self, desc: str, show: tuple[str, ...], enabled: bool = True,
                 time_left: Callable[[], float] | None = None):
        self.desc, self.show, self.time_left = desc, show, time_left
        self.enabled = enabled and is_lead_process()
        self.bar: ProgressBar | None = None

    def on_start(self, loop: TrainLoop) -> None:
        self.bar = ProgressBar(loop.last_step, initial=loop.trainer.start_step, desc=self.desc,
                               enabled=self.enabled, show=self.show, time_left=self.time_left)

    def after_step(self, loop: TrainLoop, info: StepInfo) -> None:
        if self.bar is not None:
            self.bar.update(info.metrics)

    def write(self, line: str) -> bool:
        """Print `line` above the bar; False when no bar is shown."""
        if self.bar is None or not self.enabled:
            return False
        self.bar.write(line)
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evaluate(Hook):
    """Every `every` steps before the last, call ``evaluate(step) -> metrics``; write them with
    phase ``"eval"`` through `writer` and hand them to `report(step, metrics)`."""

    def __init__(self, every: int, evaluate: Callable[[int], Mapping[str, Any]],
                 writer: MetricsWriter | None = None, report: Callable[[int, Mapping[str, Any]], None] | None = None):
        self.every, self.evaluate, self.report = every, evaluate, report
        self.writer = writer if is_lead_process() else None

    def after_step(self, loop: TrainLoop, info: StepInfo) -> None:
        if not self.every or info.step % self.every or info.step >= loop.last_step:
            return
        metrics = self.evaluate(info.step)
        if self.writer is not None:
            self.writer.write(info.step, metrics, phase="eval")
        if self.report is not None:
            self.report(info.step, metrics)
