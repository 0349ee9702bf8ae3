"""The training engine: one loop for every stage.

``fit`` trains ``model`` on ``data`` with a stage's objective, a method from
``ttkd.kd``. If a frozen ``partner`` is given (the student in ``teach``, the teacher in
``distill``) it runs beside the model in inference mode and its outputs go to the
method. Running sums of the method's named loss parts stay on the device and are read
once per epoch, so the step loop never waits for the host. The engine knows nothing of
MLflow and prints nothing: the caller gets each epoch's figures through ``on_epoch``
and may wrap the batches in a progress bar. ``TrainConfig``'s ``amp`` and ``compile``
are requests; ``ttkd.choice.choose_step`` turns them, by a short calibration where they say
``auto``, into a :class:`ttkd.step.Step` (bf16 or float32, compiled or eager), the one decision
``fit`` runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ttkd import distributed
from ttkd.config import TrainConfig
from ttkd.data import ImageData, batches
from ttkd.errors import TTKDError
from ttkd.step import Objective, Step, autocast, compiled_step, frozen

# A convolution over one input channel (grayscale images) gets its weight's gradient with
# another stride along that size-1 dimension than DDP's bucket: the same memory order,
# which DDP's layout check still reports once per process.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class Interrupted(Exception):
    """Training stopped between two steps because ``stop()`` (of this process or of any
    process of its group) returned ``signum``, the signal that asked for it."""

    def __init__(self, epoch: int, signum: int):
        super().__init__(f"interrupted in epoch {epoch}")
        self.epoch, self.signum = epoch, signum


class NonFiniteLoss(TTKDError):
    """The training loss became NaN or infinite."""


def make_optimizer(params: list[nn.Parameter], config: TrainConfig):
    """The optimiser of ``params`` and per-epoch learning-rate scheduler that ``config`` names."""
    # one fused kernel for the whole update where the parameters' device has one
    fused = {"fused": True} if params[0].device.type in ("cpu", "cuda") else {}
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, **fused)
    if config.schedule == "step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    elif config.schedule == "constant":
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return optimizer, scheduler


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """One epoch's figures; accuracies and agreement in percent."""

    epoch: int
    train: dict[str, float]    # the method's loss parts, "loss" first, each a mean over images
    val_loss: float
    val_acc: float
    lr: float                  # learning rate used during this epoch
    epoch_time_s: float        # training steps only, evaluation excluded
    throughput: float          # training images per second
    agreement: float | None    # top-1 agreement with the partner on validation; None without one

    def metrics(self, split: str = "val") -> dict[str, float]:
        """The figures as MLflow metrics: the one place their names are set. ``split`` names
        the split the evaluation figures were measured on: ``val`` (``val_acc``, ``val_loss``,
        ``agreement``) or ``holdout`` (``holdout_acc``, ``holdout_loss``, ``holdout_agreement``)."""
        figures = {k: v for k, v in dataclasses.asdict(self).items()
                   if k not in ("epoch", "train") and v is not None}
        if split != "val":
            figures = {(f"{split}_{k.removeprefix('val_')}" if k in EVALUATED else k): v for k, v in figures.items()}
        return {f"train_{k}": v for k, v in self.train.items()} | figures


EVALUATED = ("val_loss", "val_acc", "agreement")  # the figures measured on the evaluated split


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """Deterministic kernels everywhere (cuBLAS needs its workspace fixed before first use)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = not on


def rng_state() -> dict:
    """Every global random state, as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


@torch.inference_mode()
def predict(model: nn.Module, data: ImageData, batch_size: int, amp: bool = False,
            part: Callable[[int], slice] | None = None) -> torch.Tensor:
    """Float32 logits ``(N_val, K)`` of ``model`` on the validation split (with ``part``,
    on that slice of each batch: see ``ttkd.data.batches``).

    The caller sets the mode: a model loaded from the registry is already in eval mode
    and refuses ``.eval()``.
    """
    with autocast(data.val_x.device, amp):
        return torch.cat([model(x).float() for x, _ in
                          batches(data, "val", batch_size, channels_last=amp, part=part)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def no_progress(batches: Iterable, total: int, label: str) -> Iterable:
    return batches


def fit(
    model: nn.Module,
    data: ImageData,
    method: nn.Module,
    config: TrainConfig,
    partner: nn.Module | None = None,
    step: Step | None = None,
    on_epoch: Callable[[EpochStats, dict], None] | None = None,
    resume: dict | None = None,
    stop: Callable[[], int] = lambda: 0,
    progress: Callable[[Iterable, int, str], Iterable] = no_progress,
) -> list[EpochStats]:
    """Train ``model`` in place up to epoch ``config.epochs``; returns the stats of the
    epochs it ran.

    ``method`` (from ``ttkd.kd.build``) turns each step's :class:`ttkd.kd.Batch` into
    named loss parts; its own parameters are trained with the model's, and its buffers
    are part of the engine state. ``data`` and both networks must already be on the
    training device. The partner is never updated: it runs in eval mode under
    ``torch.inference_mode()``. After every epoch ``on_epoch(stats, state)`` gets the
    engine state (optimiser, method, epoch, data-order generator and every RNG); passing
    such a state back as ``resume`` (with the model's weights already loaded) continues
    exactly where it left off. ``stop()`` is asked after every step; when it returns a
    signal number, ``Interrupted`` is raised and the epoch in progress is dropped. A NaN or infinite
    loss raises ``NonFiniteLoss`` naming its step. ``progress(batches, steps, label)``
    may wrap each epoch's batches (a progress bar). ``step`` is how each step runs (precision,
    compile), decided before: by ``choose_step`` for a stage, else what ``config`` forces
    (:meth:`Step.forced`); ``fit`` never measures nor decides.

    In a process group (``ttkd.distributed``) every process calls ``fit`` alike: the
    model is wrapped in DistributedDataParallel, each process trains on its slice of
    every global batch of ``config.batch_size`` images, and its local mean loss is
    scaled so that the averaged gradient is that of the global batch's mean. The stop
    request, the NaN check, the loss sums and the validation figures are combined over
    processes, so every process returns the same stats and stops at the same step.
    BatchNorm normalises each process's slice on its own (see docs/how-to/several-gpus.md).
    """
    # (longer than the house's 60 lines only by its docstring, the engine's contract; the loop
    # itself is one screen: set-up, then per epoch the steps, the schedule, validation, on_epoch)
    device = data.train_x.device
    part = distributed.shard if distributed.world() else None
    first = resume["epoch"] + 1 if resume is not None else 1
    step = step if step is not None else Step.forced(config)
    fast = step.bf16  # bf16 and channels_last go together
    if fast:
        model.to(memory_format=torch.channels_last)
    if partner is not None:
        partner = frozen(partner, fast)
    method.to(device)
    features = getattr(method, "features", False)
    optimizer, scheduler = make_optimizer([*model.parameters(), *method.parameters()], config)
    generator = torch.Generator().manual_seed(config.seed)
    if resume is not None:
        _restore(resume, method, optimizer, scheduler, generator)
    objective = Objective(model, method, fast, features)
    if distributed.world():
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    objective, partner_run = compiled_step(objective, partner, fast, features, step.compile)
    partner_pred = (None if partner is None
                    else predict(partner, data, config.batch_size, fast, part).argmax(1))
    history = []
    for epoch in range(first, config.epochs + 1):
        model.train()
        method.train()
        batches_of = progress(batches(data, "train", config.batch_size, generator=generator,
                                      channels_last=fast, indices=True, part=part),
                              math.ceil(len(data.train_y) / config.batch_size), f"epoch {epoch}/{config.epochs}")
        train, elapsed = _train_epoch(objective, partner_run, optimizer, batches_of, epoch, config,
                                      len(data.train_y), stop)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        distributed.share_buffers(model)
        model.eval()
        val = _validate(model, data, config.batch_size, fast, part, partner_pred)
        stats = EpochStats(
            epoch=epoch, train=train, val_loss=val["loss"], val_acc=val["acc"], lr=lr,
            epoch_time_s=elapsed, throughput=len(data.train_y) / elapsed,
            agreement=val.get("agreement"),
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats, {"epoch": epoch, "optimizer": optimizer.state_dict(),
                             "method": {k: v.detach().to("cpu", copy=True) for k, v in method.state_dict().items()},
                             "generator": generator.get_state(), "rng": rng_state(),
                             "world_size": distributed.size()})
    if fast:
        model.to(memory_format=torch.contiguous_format)  # checkpoints and export in the usual layout
    return history


def _restore(resume: dict, method: nn.Module, optimizer, scheduler, generator: torch.Generator) -> None:
    """Put the engine state that ``fit``'s ``on_epoch`` was given back in place."""
    method.load_state_dict(resume["method"])
    # replay the schedule first (it computes each lr from the current one), then restore
    # the optimiser, whose saved state holds exactly the lr it had reached
    with warnings.catch_warnings():  # stepping a scheduler without optimiser steps
        warnings.simplefilter("ignore")
        for _ in range(resume["epoch"]):
            scheduler.step()
    optimizer.load_state_dict(resume["optimizer"])
    generator.set_state(resume["generator"])
    set_rng_state(resume["rng"])


def _train_epoch(objective: nn.Module, partner_run, optimizer, train_batches: Iterable, epoch: int,
                 config: TrainConfig, n_train: int, stop: Callable[[], int]) -> tuple[dict[str, float], float]:
    """One epoch of steps: each loss part's mean over the epoch's images (every process's) and
    the seconds the steps took. Raises ``Interrupted`` or ``NonFiniteLoss`` between steps."""
    world = distributed.world()
    device = next(objective.parameters()).device
    sums = None  # each loss part, summed over this process's images, on the device
    watch = _NonFiniteWatch(device)
    started = time.perf_counter()
    seen = torch.zeros((), device=device)
    epoch_t = torch.tensor(float(epoch), device=device)  # a tensor: a compiled step is not recompiled per epoch
    for step, (x, y, idx) in enumerate(train_batches, 1):
        parts = objective(x, y, epoch=epoch_t, index=idx, **(partner_run(x) if partner_run is not None else {}))
        loss = parts["loss"]
        optimizer.zero_grad(set_to_none=True)
        if world is None:
            loss.backward()
        else:  # DDP averages the gradients: weigh each mean by the process's share of the batch
            whole = min(config.batch_size, n_train - (step - 1) * config.batch_size)
            (loss * (len(y) * world.size / whole)).backward()
        optimizer.step()
        sums = torch.stack(list(parts.values())).detach() * len(y) + (0 if sums is None else sums)
        seen += len(y)
        signum, bad = distributed.agree(int(stop()), watch.step(loss, step))
        _check_finite(bad, epoch, config)
        if signum:
            raise Interrupted(epoch, signum)
    _check_finite(distributed.agree(0, watch.first_bad_step(wait=True))[1], epoch, config)
    elapsed = time.perf_counter() - started
    sums = distributed.total(torch.cat([sums, seen[None]]))
    return dict(zip(parts, (sums[:-1] / sums[-1]).tolist())), elapsed  # one host sync


def _validate(model: nn.Module, data: ImageData, batch_size: int, fast: bool,
              part: Callable[[int], slice] | None, partner_pred: torch.Tensor | None) -> dict[str, float]:
    """Validation loss, accuracy and (with ``partner_pred``, the partner's predicted
    classes on the same images) agreement in percent, summed over every process's slice."""
    logits = predict(model, data, batch_size, fast, part)
    labels = data.val_y
    if part is not None:
        n = len(labels)
        labels = labels[torch.cat([torch.arange(s, min(s + batch_size, n))[part(min(batch_size, n - s))]
                                   for s in range(0, n, batch_size)]).to(labels.device)]
    pred = logits.argmax(1)
    sums = torch.stack([t.double() for t in (
        F.cross_entropy(logits, labels, reduction="sum"), (pred == labels).sum(),
        (pred == partner_pred).sum() if partner_pred is not None else pred.new_zeros(()),
        pred.new_tensor(len(labels)))])
    loss, correct, agree, n = distributed.total(sums).tolist()
    return {"loss": loss / n, "acc": 100.0 * correct / n} | (
        {"agreement": 100.0 * agree / n} if partner_pred is not None else {})


class _NonFiniteWatch:
    """Finds the first step of an epoch whose loss is NaN or infinite without making the
    host wait for the device. The device keeps that step's number; every 25 steps it is
    copied to the host without blocking, and read once the copy is done: at once on a
    CPU, a few steps later on a GPU. ``first_bad_step(wait=True)`` ends the epoch."""

    EVERY = 25

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.bad = torch.full((), -1, device=device)
        self.host = torch.full((), -1, pin_memory=self.cuda)
        self.copied = None  # CUDA event recorded after the last copy to the host

    def step(self, loss: torch.Tensor, step: int) -> int:
        """Record ``step``'s loss; return the first bad step seen so far, or -1."""
        self.bad = torch.where((self.bad < 0) & ~torch.isfinite(loss.detach()), step, self.bad)
        if step % self.EVERY:
            return -1
        seen = self.first_bad_step()
        self.host.copy_(self.bad, non_blocking=self.cuda)
        if self.cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()
        return seen if seen >= 0 else self.first_bad_step()

    def first_bad_step(self, wait: bool = False) -> int:
        if wait:
            if self.cuda:
                torch.cuda.synchronize()
            self.host.copy_(self.bad)
        elif self.copied is not None and not self.copied.query():
            return -1  # the last copy has not landed yet
        return int(self.host)


def check_batch(n_train: int, n_val: int, batch_size: int, processes: int) -> None:
    """Refuse a batch size larger than the training split (every epoch would be one step
    on fewer images than asked for), or one that would leave a process with fewer than 2
    images of a training batch (BatchNorm needs 2) or none of a validation batch."""
    if batch_size > n_train:
        raise TTKDError(f"batch_size {batch_size} is larger than the training split ({n_train} images); "
                        f"choose a batch_size of at most {n_train}")
    if processes == 1:
        return
    short = [f"{what} ({n % batch_size} images)" for what, n, need in
             (("the last training batch", n_train, 2 * processes), ("the last validation batch", n_val, processes))
             if 0 < n % batch_size < need]
    if batch_size < 2 * processes or short:
        what = "each batch" if batch_size < 2 * processes else short[0]
        raise TTKDError(f"batch_size {batch_size} leaves {what} too small to share among {processes} "
                        f"processes (2 training images or 1 validation image each); choose another batch_size")


def _check_finite(step: int, epoch: int, config: TrainConfig) -> None:
    if step >= 0:
        raise NonFiniteLoss(f"the training loss became NaN or infinite at epoch {epoch}, step {step}; "
                            f"lower lr (now {config.lr}) or check the data")
