"""What a stage does after each epoch: callbacks that ``fit`` calls through ``on_epoch``.

A callback is ``callback(stats, state)``: the epoch's :class:`ttkd.engine.EpochStats` and the
engine state a checkpoint keeps. A stage runs its own in this order: the fence (a newer
attempt at the run writes from now on), the calibration's check, the checkpoint, the epoch's
metrics (after its checkpoint: an epoch with metrics always has one), the console line; then
the caller's (``run_stage(callbacks=...)``: a search's pruner). A callback that raises stops
training, and the stage ends its run FAILED with that error; one that raises
:class:`StopTraining` ends it FINISHED, with the tags it gives.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ttkd import calibration, tracking
from ttkd.choice import StepChoice
from ttkd.engine import EpochStats

log = logging.getLogger(__name__)  # shown by the entry points (entry/options.py)

Callback = Callable[[EpochStats, dict], None]


class StopTraining(Exception):
    """Raised by a callback to end training after epoch ``epoch`` as planned (a search's pruner
    stops a hopeless trial): the stage ends its run FINISHED with ``tags`` and raises this on."""

    def __init__(self, message: str, epoch: int, tags: dict[str, str]):
        super().__init__(message)
        self.epoch, self.tags = epoch, tags

# tests only: seconds each epoch waits after its metrics, so that a test on a real cluster sees a
# run mid-way whatever the machine's speed (set in the environment of the nodes' processes)
TEST_EPOCH_DELAY = "TTKD_TEST_EPOCH_DELAY_S"
# tests only: once the file this names exists, the next epoch to finish removes it and stops its
# own process (SIGSTOP) right after its writes: a node cut off at a known point of its work
TEST_FREEZE_FILE = "TTKD_TEST_FREEZE_FILE"


class Checkpoints:
    """A run's ``last.pt`` (every epoch) and ``best.pt`` (whenever val_acc is the best so
    far), written atomically in ``folder`` and then logged with their digests; ``best``:
    the best val_acc so far (a resumed run's from its checkpoint). ``meta``: what every
    checkpoint says of its stage (format, stage, arch, classes, image shape)."""

    def __init__(self, run_id: str, model: torch.nn.Module, folder: Path, meta: dict, best: float = -1.0,
                 resumed: bool = False):
        self.model, self.folder, self.meta, self.best = model, folder, meta, best
        self.written = tracking.checkpoint_digests(run_id) if resumed else {}  # their SHA-256 so far

    def __call__(self, s: EpochStats, engine: dict) -> None:
        self.best = max(self.best, s.val_acc)
        state = self.meta | {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                             "engine": engine, "epoch": s.epoch, "val_acc": s.val_acc,
                             "best_val_acc": self.best, "stats": dataclasses.asdict(s)}
        files = [self.folder / "last.pt"] + ([self.folder / "best.pt"] if s.val_acc == self.best else [])
        for file in files:
            tracking.save_checkpoint(file, state)
        tracking.log_checkpoints(files, self.written)


def metrics(partner_acc: float | None, split: str = "val") -> Callback:
    """Log the epoch's metrics (and the partner's accuracy beside them) at step = epoch,
    named by the ``split`` they were measured on."""
    return lambda s, engine: tracking.log_epoch(s, partner_acc, split)


def console(epochs: int, split: str = "val") -> Callback:
    """One line per epoch on the log."""
    return lambda s, engine: log.info(summary(s, epochs, split))


def recheck(choice: StepChoice) -> Callback:
    """After epoch 1: drop the cached calibration that chose the step if the real epoch
    trained far faster than it said (it was measured on a busy machine)."""
    def check(s: EpochStats, engine: dict) -> None:
        chosen = choice.step.describe()
        if s.epoch == 1 and choice.key and calibration.recheck(choice.key, chosen, s.throughput):
            log.warning(f"the cached calibration of {chosen} ({choice.rates[chosen]:,.0f} img/s) is "
                        f"far below what epoch 1 trained at ({s.throughput:,.0f} img/s): it was measured "
                        f"while the machine was busy; dropped, the next stage measures again")
    return check


def test_hooks(s: EpochStats, engine: dict) -> None:
    """Tests only: the epoch delay and the freeze (``TEST_EPOCH_DELAY``, ``TEST_FREEZE_FILE``)."""
    time.sleep(float(os.environ.get(TEST_EPOCH_DELAY, "0")))
    freeze = os.environ.get(TEST_FREEZE_FILE)
    if freeze and os.path.exists(freeze):
        os.remove(freeze)
        os.kill(os.getpid(), signal.SIGSTOP)


def run_all(callbacks: Iterable[Callback]) -> Callback:
    """One ``on_epoch`` that calls ``callbacks`` in order."""
    callbacks = list(callbacks)

    def on_epoch(s: EpochStats, engine: dict) -> None:
        for callback in callbacks:
            callback(s, engine)
    return on_epoch


def summary(s: EpochStats, epochs: int, split: str = "val") -> str:
    """One line per epoch for the terminal, the evaluation figures named by their ``split``."""
    parts = " ".join(f"{k} {v:.4f}" for k, v in s.train.items() if k != "loss")
    agree = f"  agreement {s.agreement:.1f}%" if s.agreement is not None else ""
    return (f"epoch {s.epoch:>3}/{epochs}  loss {s.train['loss']:.4f} ({parts})  "
            f"{split}_loss {s.val_loss:.4f}  {split}_acc {s.val_acc:.2f}%{agree}  "
            f"lr {s.lr:.4g}  {s.throughput:,.0f} img/s")

