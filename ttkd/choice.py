"""How a stage's training step runs, decided once: :func:`choose_step` turns ``TrainConfig``'s
requests (``amp``, ``compile``; ``auto`` measured by ``ttkd.calibration``) into a
:class:`ttkd.step.Step` and says why. ``fit`` runs the ``Step`` it is given and decides nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import torch
from torch import nn

from ttkd import calibration, distributed
from ttkd.config import TrainConfig
from ttkd.data import ImageData, batches
from ttkd.engine import make_optimizer
from ttkd.step import Objective, Step, bf16_supported, compiled_step, compiler_available, device_name, frozen


@dataclasses.dataclass(frozen=True)
class StepChoice:
    """How a stage's training step runs, and why: ``choose_step``'s answer."""

    bf16: bool                 # bf16 autocast and channels_last; else float32
    reason: str                # the precision's: "amp=true", "amp=false", "no native bf16", "measured", "cached"
    rates: dict[str, float]    # measured (or cached) training images/s per path; empty if none was measured
    compile: str | None = None  # the torch.compile mode the step runs in; None: eager
    compile_reason: str = "compile=false"  # why it is (not) compiled, as the stage prints it
    compile_s: float | None = None         # the compiled path's compile and warm-up time, when measured
    key: str | None = None     # the calibration cache's key of these figures (None: nothing measured)

    @property
    def step(self) -> Step:
        return Step(self.bf16, self.compile)


# bf16 rounds more coarsely, so on a CPU it must be clearly faster to be chosen; on a GPU
# it is kept unless clearly slower (it also halves activation memory there)
BF16_MARGIN = {"cpu": 1.05, "cuda": 0.95}
# torch.compile modes auto tries; on a CPU compiling takes 10-35 s, so a stage expected to
# last less than MIN_COMPILE_STAGE_S eagerly is not compiled, nor measured compiled
COMPILE_MODES = {"cpu": ("default",), "cuda": ("default", "max-autotune-no-cudagraphs")}
MIN_COMPILE_STAGE_S = 60.0


def choose_step(model: nn.Module, data: ImageData, method: nn.Module, config: TrainConfig,
                partner: nn.Module | None = None, steps: int | None = None) -> StepChoice:
    """``config.amp`` and ``config.compile`` as decisions, for a stage of ``steps``
    optimiser steps (default: ``config.epochs`` epochs).

    Precision: forced by amp True or False; with "auto", float32 where the device has no
    native bf16, else the faster of float32 and bf16 as measured on copies of the networks
    and the method, on one training batch of the real shape (this process's share of it),
    through the step ``fit`` runs. Compile: forced by compile True or False (eager, with
    ``compile_reason`` saying why, where no C++ compiler is found on a CPU); with "auto",
    eager under ``deterministic`` or when the stage is too short to repay a compile, else
    the faster, counting its compile time, of the eager step and the compiled one (the
    whole step: the model with the method's loss, and the partner's forward), measured in
    the chosen precision. Measurements are cached (``ttkd.calibration``). Neither the
    networks, the method nor any random state change: a run trains alike whether the
    choice was measured now or taken from the cache."""
    trial = _Trial(model, data, method, config, partner, steps)
    bf16, reason, rates = _precision(trial)
    return _compile(trial, bf16, reason, rates)


class _Trial:
    """The step ``fit`` would run, built on copies of the networks and the method and timed on
    one training batch of the real shape (this process's share of it); the cache key says what
    decides its speed."""

    def __init__(self, model: nn.Module, data: ImageData, method: nn.Module, config: TrainConfig,
                 partner: nn.Module | None, steps: int | None):
        self.model, self.data, self.method, self.config, self.partner = model, data, method, config, partner
        self.device = data.train_x.device
        self.n = min(len(data.train_y), math.ceil(config.batch_size / distributed.size()))
        self.steps = steps if steps is not None else config.epochs * math.ceil(len(data.train_y) / config.batch_size)
        self.key = " ".join([
            f"model={_describe(model)}", f"partner={_describe(partner)}", f"method={type(method).__name__}",
            f"batch={self.n}x{'x'.join(map(str, data.image_shape))}", f"device={device_signature(self.device)}",
            f"threads={torch.get_num_threads()}", f"torch={torch.__version__}"])

    def path(self, fast: bool, mode: str | None = None):
        """A builder of one step of this path (bf16 with ``fast``; compiled in ``mode``)."""
        features = getattr(self.method, "features", False)

        def build():
            net, method = copy.deepcopy(self.model), copy.deepcopy(self.method)
            if fast:
                net.to(memory_format=torch.channels_last)
            twin = frozen(self.partner, fast) if self.partner is not None else None
            objective = Objective(net, method, fast, features).train()
            run, partner_run = compiled_step(objective, twin, fast, features, mode)
            optimizer, _ = make_optimizer([*net.parameters(), *method.parameters()], self.config)
            x, y, idx = next(batches(self.data, "train", self.n, generator=torch.Generator().manual_seed(0),
                                     channels_last=fast, indices=True))
            epoch = torch.tensor(1.0, device=self.device)  # as fit passes it

            def step():
                loss = run(x, y, epoch=epoch, index=idx, **(partner_run(x) if twin is not None else {}))["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step
        return build

    def measure(self, paths: dict) -> calibration.Measured:
        """``paths`` timed (or read from the cache), leaving every random state as it was."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return calibration.measure(self.key, paths, self.n, sync, stage_images=self.steps * self.n)


def _precision(trial: _Trial) -> tuple[bool, str, dict[str, float]]:
    """bf16 or not, why, and the rates measured to decide it (none when it was forced)."""
    amp = trial.config.amp
    if amp != "auto":
        return bool(amp), f"amp={str(bool(amp)).lower()}", {}
    if not bf16_supported(trial.device):
        return False, "no native bf16", {}
    eager = trial.measure({"float32": trial.path(False), "bf16": trial.path(True)})
    rates = dict(eager.rates)
    bf16 = rates["bf16"] / BF16_MARGIN.get(trial.device.type, 1.0) > rates["float32"]
    return bf16, "cached" if eager.cached else "measured", rates


def _compile(trial: _Trial, bf16: bool, reason: str, rates: dict[str, float]) -> StepChoice:
    """The compile decision in the chosen precision, with the precision's as the answer."""
    config, device, n, steps = trial.config, trial.device, trial.n, trial.steps
    precision = "bf16" if bf16 else "float32"

    def chosen(*args) -> StepChoice:
        return StepChoice(bf16, reason, rates, *args, key=trial.key if rates else None)

    if config.compile is False:
        return chosen()
    if device.type == "cpu" and not compiler_available():
        return chosen(None, f"compile={_word(config.compile)}: no C++ compiler found "
                            f"(torch.compile needs one on a CPU; install g++ or set CXX): trained eagerly")
    if config.compile is not True and config.compile != "auto":  # a mode, already decided
        return chosen(str(config.compile), f"compile={config.compile}")
    modes = COMPILE_MODES.get(device.type, ("default",))
    if config.compile is True:
        return chosen(modes[0], "compile=true")
    if config.deterministic:
        return chosen(None, "compile=auto: deterministic=true trains eagerly")
    if precision not in rates:
        rates |= trial.measure({precision: trial.path(bf16)}).rates
    eager_s = steps * n / rates[precision]
    if eager_s < MIN_COMPILE_STAGE_S:
        return chosen(None, f"compile=auto: a stage of about {eager_s:.{1 if eager_s < 10 else 0}f} s "
                            f"cannot repay compiling")
    try:
        compiled = trial.measure({f"{precision}+{mode}": trial.path(bf16, mode) for mode in modes})
    except Exception as exc:  # a compiler error: say it, train eagerly
        return chosen(None, f"compile=auto: compiling failed ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}): trained eagerly")
    rates |= compiled.rates
    total = {mode: compiled.setup_s[f"{precision}+{mode}"] + steps * n / rates[f"{precision}+{mode}"]
             for mode in modes}
    best = min(total, key=total.get)
    setup = compiled.setup_s[f"{precision}+{best}"]
    how = (f"{rates[f'{precision}+{best}']:,.0f} img/s compiled ({best}) after {setup:.0f} s of compiling: "
           f"about {total[best]:.0f} s for the stage against {eager_s:.0f} s eager")
    if total[best] < eager_s:
        return chosen(best, f"compile=auto: {how}", setup)
    return chosen(None, f"compile=auto: {how}; trained eagerly", setup)


def _word(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve", "bf16")


def device_signature(device: torch.device) -> str:
    """What decides a device's speed, as the calibration cache tells machines apart: a GPU's
    name; a CPU's model name, its speed-deciding instruction sets and its core count (a home
    folder shared by a cluster's nodes shares the cache)."""
    if device.type == "cuda":
        return device_name(device)
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"{device_name(device)} [{'+'.join(f for f in SPEED_FLAGS if f in flags) or 'none'}] x{os.cpu_count()}"


def _describe(net: nn.Module | None) -> str:
    return "-" if net is None else f"{type(net).__name__}({sum(p.numel() for p in net.parameters())})"
