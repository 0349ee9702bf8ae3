"""How one training step runs: on which device, in which precision, compiled or not.

A :class:`Step` is the decision (bf16 or float32, a ``torch.compile`` mode or eager) that
``ttkd.choice.choose_step`` takes once per stage and ``ttkd.engine.fit`` runs. The
:class:`Objective` is the model and its method as one module whose ``forward`` is a step's
loss; the frozen partner runs beside it through :func:`partner_outputs`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import platform

import torch
from torch import nn

from ttkd import calibration
from ttkd.config import TrainConfig
from ttkd.errors import TTKDError
from ttkd.kd import Batch

# inductor's compiled graphs beside the calibration cache, shared by the processes this one
# starts (a sweep's workers, a group's ranks); torch fixes the folder when inductor is first
# imported, so it is set here, before that
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(calibration.cache_dir() / "inductor"))

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
    """bf16 autocast on ``device`` when ``enabled`` (emulated, and slower, where the device
    has no native bf16), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)



def frozen(partner: nn.Module, fast: bool) -> nn.Module:
    """The frozen partner as the step loop runs it: a copy, so the caller's network is
    left as it was; with ``fast``, in channels_last and with its weights cast to bf16
    once, instead of by autocast at every step (it never learns, so no float32 master
    copy is needed). Its logits differ from float32 ones by bf16 rounding only."""
    partner = copy.deepcopy(partner)
    if fast:
        partner.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    return partner


def partner_outputs(partner: nn.Module, x: torch.Tensor, fast: bool, features: bool) -> dict:
    """The frozen partner's fields of a :class:`ttkd.kd.Batch`: its float32 logits, and
    with ``features`` its embedding and stage maps; in inference mode (bf16 when ``fast``)."""
    with autocast(x.device, fast), torch.inference_mode():
        if features:
            stages, embedding = partner.forward_stages(x)
            out = [partner.forward_head(embedding), embedding, *stages]
        else:
            out = [partner(x)]
    # inference tensors cannot be saved for backward: take normal float32 copies
    out = [t.float().clone() for t in out]
    return ({"partner_logits": out[0], "partner_embedding": out[1], "partner_stages": out[2:]}
            if features else {"partner_logits": out[0]})


class Objective(nn.Module):
    """The trained model and its method as one module, whose ``forward`` is a whole
    training step's loss: DistributedDataParallel averages the gradients of exactly what
    runs in ``forward``, so the method's own parameters (a FitNet regressor) are averaged
    with the model's."""

    def __init__(self, model: nn.Module, method: nn.Module, fast: bool, features: bool):
        super().__init__()
        self.model, self.method, self.fast, self.features = model, method, fast, features

    def forward(self, x: torch.Tensor, y: torch.Tensor, **batch) -> dict[str, torch.Tensor]:
        """The method's named loss parts for images ``x`` and labels ``y``; ``batch`` fills
        the other fields of the :class:`ttkd.kd.Batch` (partner outputs, epoch, index)."""
        b = Batch(logits=None, labels=y, **batch)
        with autocast(x.device, self.fast):
            if self.features:
                stages, embedding = self.model.forward_stages(x)
                b.logits = self.model.forward_head(embedding).float()
                b.stages, b.embedding = [t.float() for t in stages], embedding.float()
            else:
                b.logits = self.model(x).float()  # losses in float32, whatever the compute dtype
        return self.method(b)


@dataclasses.dataclass(frozen=True)
class Step:
    """How the training step runs: the decision, as distinct from ``TrainConfig``'s request
    (``amp`` and ``compile``, which may say ``auto``)."""

    bf16: bool = False          # bf16 autocast and channels_last; else float32
    compile: str | None = None  # the torch.compile mode of the step; None: eager

    @classmethod
    def forced(cls, config: TrainConfig) -> Step:
        """The step ``config`` forces (amp True/False, compile False/True/a mode); ``auto``
        needs ``choose_step``."""
        if "auto" in (config.amp, config.compile):
            raise TTKDError("amp=auto and compile=auto are decided by choose_step; pass its step to fit")
        mode = "default" if config.compile is True else config.compile or None
        return cls(bool(config.amp), mode)

    def describe(self) -> str:
        """``bf16``, ``float32+default`` and the like: the calibration's name of this path."""
        return ("bf16" if self.bf16 else "float32") + (f"+{self.compile}" if self.compile else "")


def compiler_available() -> bool:
    """Whether inductor finds the C++ compiler it needs for CPU code."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, OSError, RuntimeError):
        return False
    return True


def compiled_step(objective: nn.Module, partner: nn.Module | None, fast: bool, features: bool,
                  mode: str | None):
    """``(objective, partner forward)`` as the step calls them: with ``mode``, both
    through ``torch.compile`` (the whole objective, so a feature-based method's
    ``forward_stages`` and loss are compiled too; the partner's inference-mode forward),
    their compiled graphs kept in inductor's cache under the ttkd cache folder, shared by the
    stages of a sweep and the processes of a group; else as they are."""
    partner_run = None if partner is None else functools.partial(partner_outputs, partner, fast=fast,
                                                                 features=features)
    if mode is None:
        return objective, partner_run
    # static shapes: one graph for the full batch, one for the last; with torch's automatic
    # dynamic shapes a run would switch kernels after its first short batch, and a resumed
    # run (which has not seen one yet) would round differently from an uninterrupted one
    return (torch.compile(objective, mode=mode, dynamic=False),
            None if partner_run is None else torch.compile(partner_run, mode=mode, dynamic=False))


def device_name(device: torch.device) -> str:
    """The GPU's or CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
