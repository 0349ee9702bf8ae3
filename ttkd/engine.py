"""The training engine: one loop for every stage.

``fit`` trains ``model`` on ``data`` with a stage's objective, a method from
``ttkd.kd``. If a frozen ``partner`` is given (the student in ``teach``, the teacher in
``distill``) it runs beside the model in inference mode and its outputs go to the
method. Running sums of the method's named loss parts stay on the device and are read
once per epoch, so the step loop never waits for the host. The engine knows nothing of
MLflow and prints nothing: the caller gets each epoch's figures through ``on_epoch``
and may wrap the batches in a progress bar.
"""

from __future__ import annotations

import copy
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

from ttkd.data import ImageData, batches
from ttkd.errors import TTKDError
from ttkd.kd import Batch


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30            # passes over the training split
    batch_size: int = 64        # images per optimiser step
    optimizer: str = "sgd"      # "sgd" (with momentum) or "adam"
    lr: float = 0.05            # initial learning rate
    momentum: float = 0.9       # SGD momentum; unused by adam
    weight_decay: float = 5e-4  # L2 penalty on every parameter
    schedule: str = "cosine"    # "cosine" (to 0 at the last epoch), "step" or "constant"
    milestones: tuple[int, ...] = ()  # "step": lr is multiplied by gamma after these epochs
    gamma: float = 0.1          # "step": the factor applied at each milestone
    seed: int = 0               # fixes weight init, data order and augmentation
    device: str = "auto"        # "auto": cuda if available, else cpu
    amp: bool = True            # bf16 autocast and channels_last where the device supports bf16
    compile: bool = False       # torch.compile the trained model (slow first epoch, faster after)
    deterministic: bool = False  # deterministic kernels: a resumed run repeats an uninterrupted one


class Interrupted(Exception):
    """Training stopped between two steps because ``stop()`` said so (a signal)."""

    def __init__(self, epoch: int):
        super().__init__(f"interrupted in epoch {epoch}")
        self.epoch = epoch


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

    def metrics(self) -> dict[str, float]:
        """The figures as MLflow metrics: the one place their names are set."""
        figures = {k: v for k, v in dataclasses.asdict(self).items()
                   if k not in ("epoch", "train") and v is not None}
        return {f"train_{k}": v for k, v in self.train.items()} | figures


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TTKDError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TTKDError("device cuda was asked for but no CUDA GPU is visible; use device=cpu")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions and matrix products natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` and supported, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and bf16_supported(device))


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
def predict(model: nn.Module, data: ImageData, batch_size: int, amp: bool = False) -> torch.Tensor:
    """Float32 logits ``(N_val, K)`` of ``model`` on the validation split.

    The caller sets the mode: a model loaded from the registry is already in eval mode
    and refuses ``.eval()``.
    """
    with autocast(data.val_x.device, amp):
        return torch.cat([model(x).float() for x, _ in
                          batches(data, "val", batch_size, channels_last=amp)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def frozen(partner: nn.Module, fast: bool) -> nn.Module:
    """The frozen partner as the step loop runs it: a copy, so the caller's network is
    left as it was; with ``fast``, in channels_last and with its weights cast to bf16
    once, instead of by autocast at every step (it never learns, so no float32 master
    copy is needed). Its logits differ from float32 ones by bf16 rounding only."""
    partner = copy.deepcopy(partner)
    if fast:
        partner.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    return partner


def forward(model: nn.Module, partner: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
            fast: bool, features: bool = False, **batch) -> Batch:
    """The step's :class:`ttkd.kd.Batch`: float32 logits ``(B, K)`` of the trained model
    and of the frozen partner (None without one), and with ``features`` both networks'
    stage maps and embeddings; computed in bf16 autocast when ``fast``, the partner in
    inference mode. ``batch`` fills the remaining fields (epoch, index)."""
    b = Batch(logits=None, labels=y, **batch)
    with autocast(x.device, fast):
        if partner is not None:
            with torch.inference_mode():
                if features:
                    stages, embedding = partner.forward_stages(x)
                    out = [partner.forward_head(embedding), embedding, *stages]
                else:
                    out = [partner(x)]
            # inference tensors cannot be saved for backward: take normal float32 copies
            out = [t.float().clone() for t in out]
            b.partner_logits = out[0]
            if features:
                b.partner_embedding, b.partner_stages = out[1], out[2:]
        if features:
            stages, embedding = model.forward_stages(x)
            b.logits = model.forward_head(embedding).float()
            b.stages, b.embedding = [t.float() for t in stages], embedding.float()
        else:
            b.logits = model(x).float()  # losses in float32, whatever the compute dtype
    return b


def no_progress(batches: Iterable, total: int, label: str) -> Iterable:
    return batches


def fit(
    model: nn.Module,
    data: ImageData,
    method: nn.Module,
    config: TrainConfig,
    partner: nn.Module | None = None,
    on_epoch: Callable[[EpochStats, dict], None] | None = None,
    resume: dict | None = None,
    stop: Callable[[], bool] = lambda: False,
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
    exactly where it left off. ``stop()`` is asked after every step; when it says yes,
    ``Interrupted`` is raised and the epoch in progress is dropped. A NaN or infinite
    loss raises ``NonFiniteLoss`` naming its step. ``progress(batches, steps, label)``
    may wrap each epoch's batches (a progress bar).
    """
    device = data.train_x.device
    fast = config.amp and bf16_supported(device)  # bf16 and channels_last go together
    if fast:
        model.to(memory_format=torch.channels_last)
    if partner is not None:
        partner = frozen(partner, fast)
    method.to(device)
    features = getattr(method, "features", False)
    step_model = torch.compile(model) if config.compile and not features else model
    optimizer, scheduler = make_optimizer([*model.parameters(), *method.parameters()], config)
    generator = torch.Generator().manual_seed(config.seed)
    first = 1
    if resume is not None:
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
        first = resume["epoch"] + 1
    partner_pred = (None if partner is None
                    else predict(partner, data, config.batch_size, fast).argmax(1))
    steps = math.ceil(len(data.train_y) / config.batch_size)
    history = []
    for epoch in range(first, config.epochs + 1):
        model.train()
        method.train()
        sums = None  # each loss part, summed over images, on the device
        watch = _NonFiniteWatch(device)
        started = time.perf_counter()
        train_batches = batches(data, "train", config.batch_size, generator=generator,
                                channels_last=fast, indices=True)
        for step, (x, y, idx) in enumerate(progress(train_batches, steps, f"epoch {epoch}/{config.epochs}"), 1):
            parts = method(forward(step_model, partner, x, y, fast, features, epoch=epoch, index=idx))
            loss = parts["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums = torch.stack(list(parts.values())).detach() * len(y) + (0 if sums is None else sums)
            _check_finite(watch.step(loss, step), epoch, config)
            if stop():
                raise Interrupted(epoch)
        _check_finite(watch.first_bad_step(wait=True), epoch, config)  # waits for the device
        elapsed = time.perf_counter() - started
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        train = dict(zip(parts, (sums / len(data.train_y)).tolist()))  # one host sync
        model.eval()
        val_logits = predict(step_model, data, config.batch_size, fast)
        stats = EpochStats(
            epoch=epoch, train=train,
            val_loss=F.cross_entropy(val_logits, data.val_y).item(),
            val_acc=accuracy(val_logits, data.val_y), lr=lr, epoch_time_s=elapsed,
            throughput=len(data.train_y) / elapsed,
            agreement=None if partner_pred is None
            else 100.0 * (val_logits.argmax(1) == partner_pred).float().mean().item(),
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats, {"epoch": epoch, "optimizer": optimizer.state_dict(),
                             "method": {k: v.detach().to("cpu", copy=True) for k, v in method.state_dict().items()},
                             "generator": generator.get_state(), "rng": rng_state()})
    if fast:
        model.to(memory_format=torch.contiguous_format)  # checkpoints and export in the usual layout
    return history


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


def _check_finite(step: int, epoch: int, config: TrainConfig) -> None:
    if step >= 0:
        raise NonFiniteLoss(f"the training loss became NaN or infinite at epoch {epoch}, step {step}; "
                            f"lower lr (now {config.lr}) or check the data")
