"""The one loop and its hooks, driven by a trainer made of plain Python (no model): which steps
run, what is saved when, how a signal, the budget or an exception ends it."""

import json
import os
import signal
import time

import pytest

from jaxsql.metrics import MetricsWriter, read_metrics
from rl.loop import Budget, Evaluate, LogMetrics, SaveEvery, StepInfo, StopOnSignal, TrainLoop


class FakeTrainer:
    def __init__(self, start_step=0, on_step=None):
        self.start_step = start_step
        self.ran, self.saved, self.waits = [], [], 0
        self.on_step = on_step

    def step(self, step):
        self.ran.append(step)
        if self.on_step:
            self.on_step(step)
        return {"train/loss": 1.0 / (step + 1), "x": float("nan")}

    def save(self, step):
        if step in self.saved:
            return False
        self.saved.append(step)
        return True

    def wait_for_saves(self):
        self.waits += 1


def test_runs_to_the_end_saving_every_n_and_at_the_end(tmp_path):
    t = FakeTrainer(start_step=2)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    loop = TrainLoop(t, total_steps=7, hooks=[SaveEvery(2), LogMetrics(writer, every=2, close_writer=True)])
    infos = list(loop.steps())
    assert [i.step for i in infos] == [3, 4, 5, 6, 7] and isinstance(infos[0], StepInfo)
    assert t.ran == [2, 3, 4, 5, 6]
    assert t.saved == [4, 6, 7] and t.waits == 1
    r = loop.result
    assert r.step == 7 and r.stop_reason is None and r.start_step == 2 and len(r.history) == 5
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [4, 6, 7]  # every 2nd step and the last
    assert rows[0]["x"] is None  # strict JSON
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0], parse_constant=pytest.fail)


def test_until_ends_a_partial_session_with_a_checkpoint():
    t = FakeTrainer()
    r = TrainLoop(t, total_steps=10, hooks=[SaveEvery(0)], until=3).run()
    assert r.step == 3 and r.stop_reason is None and t.saved == [3]


def test_signal_finishes_the_step_saves_and_stops():
    t = FakeTrainer(on_step=lambda s: os.kill(os.getpid(), signal.SIGINT) if s == 1 else None)
    before = signal.getsignal(signal.SIGINT)
    r = TrainLoop(t, total_steps=10, hooks=[StopOnSignal(), SaveEvery(0)]).run()
    assert r.step == 2 and r.stopped_by_signal and t.saved == [2]
    assert signal.getsignal(signal.SIGINT) is before


def test_budget_stops_before_and_between_steps():
    t = FakeTrainer()
    r = TrainLoop(t, total_steps=10, hooks=[Budget(time.time() - 1)]).run()
    assert r.step == 0 and r.stop_reason == "budget" and t.ran == [] and t.saved == [0]
    deadline = [time.time() + 3600]
    b = Budget(deadline[0])
    t = FakeTrainer(on_step=lambda s: setattr(b, "deadline", time.time() - 1) if s == 3 else None)
    r = TrainLoop(t, total_steps=10, hooks=[b]).run()
    assert r.step == 4 and r.stop_reason == "budget" and t.saved == [4]


def test_an_exception_ends_the_loop_without_saving_and_closes_hooks():
    closed = []

    class Spy(StopOnSignal):
        def close(self):
            super().close()
            closed.append(True)

    def boom(s):
        if s == 2:
            raise RuntimeError("killed")

    t = FakeTrainer(on_step=boom)
    with pytest.raises(RuntimeError):
        TrainLoop(t, total_steps=10, hooks=[Spy(), SaveEvery(1)]).run()
    assert t.saved == [1, 2] and closed == [True]  # only the periodic ones, none at the end


def test_evaluate_every_n_steps_before_the_last(tmp_path):
    seen = []
    writer = MetricsWriter(tmp_path, tensorboard=False)
    ev = Evaluate(2, lambda step: {"ex_set": step / 10}, writer=writer, report=lambda s, m: seen.append((s, m)))
    TrainLoop(FakeTrainer(), total_steps=6, hooks=[ev]).run()
    writer.close()
    assert [s for s, _ in seen] == [2, 4]
    assert [(r["phase"], r["step"], r["ex_set"]) for r in read_metrics(tmp_path, "eval")] == [
        ("eval", 2, 0.2), ("eval", 4, 0.4)]
