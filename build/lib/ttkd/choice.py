"""How a stage's training step runs, decided once: :func:`choose_step` turns ``TrainConfig``'s
requests (``amp``, ``compile``; ``auto`` measured by ``ttkd.calibration``) into a
:class:`ttkd.engine.Step` and says why. ``fit`` runs the ``Step`` it is given and decides nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import torch
from torch import nn

from ttkd import calibration, distributed, engine
from ttkd.data import ImageData, batches
from ttkd.engine import Objective, Step, TrainConfig, compiled_step, device_name, frozen, make_optimizer


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
    device = data.train_x.device
    n = min(len(data.train_y), math.ceil(config.batch_size / distributed.size()))
    steps = steps if steps is not None else config.epochs * math.ceil(len(data.train_y) / config.batch_size)
    features = getattr(method, "features", False)

    def path(fast: bool, mode: str | None = None):
        def build():
            net, objective_method = copy.deepcopy(model), copy.deepcopy(method)
            if fast:
                net.to(memory_format=torch.channels_last)
            twin = frozen(partner, fast) if partner is not None else None
            objective = Objective(net, objective_method, fast, features).train()
            run, partner_run = compiled_step(objective, twin, fast, features, mode)
            optimizer, _ = make_optimizer([*net.parameters(), *objective_method.parameters()], config)
            x, y, idx = next(batches(data, "train", n, generator=torch.Generator().manual_seed(0),
                                     channels_last=fast, indices=True))
            epoch = torch.tensor(1.0, device=device)  # as fit passes it

            def step():
                loss = run(x, y, epoch=epoch, index=idx, **(partner_run(x) if twin is not None else {}))["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step
        return build

    key = " ".join([f"model={_describe(model)}", f"partner={_describe(partner)}",
                    f"method={type(method).__name__}", f"batch={n}x{'x'.join(map(str, data.image_shape))}",
                    f"device={device_signature(device)}", f"threads={torch.get_num_threads()}",
                    f"torch={torch.__version__}"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def chosen(*args) -> StepChoice:
        return StepChoice(*args, key=key if rates else None)

    def measure(paths: dict) -> calibration.Measured:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return calibration.measure(key, paths, n, sync, stage_images=steps * n)

    # precision
    rates: dict[str, float] = {}
    if config.amp != "auto":
        bf16, reason = bool(config.amp), f"amp={str(bool(config.amp)).lower()}"
    elif not engine.bf16_supported(device):
        bf16, reason = False, "no native bf16"
    else:
        eager = measure({"float32": path(False), "bf16": path(True)})
        rates = dict(eager.rates)
        bf16 = rates["bf16"] / BF16_MARGIN.get(device.type, 1.0) > rates["float32"]
        reason = "cached" if eager.cached else "measured"
    precision = "bf16" if bf16 else "float32"

    # compile
    if config.compile is False:
        return chosen(bf16, reason, rates)
    if device.type == "cpu" and not engine.compiler_available():
        return chosen(bf16, reason, rates, None, f"compile={_word(config.compile)}: no C++ compiler found "
                          f"(torch.compile needs one on a CPU; install g++ or set CXX): trained eagerly")
    if config.compile is not True and config.compile != "auto":  # a mode, already decided
        return chosen(bf16, reason, rates, str(config.compile), f"compile={config.compile}")
    modes = COMPILE_MODES.get(device.type, ("default",))
    if config.compile is True:
        return chosen(bf16, reason, rates, modes[0], "compile=true")
    if config.deterministic:
        return chosen(bf16, reason, rates, None, "compile=auto: deterministic=true trains eagerly")
    if precision not in rates:
        rates |= measure({precision: path(bf16)}).rates
    eager_s = steps * n / rates[precision]
    if eager_s < MIN_COMPILE_STAGE_S:
        return chosen(bf16, reason, rates, None, f"compile=auto: a stage of about "
                          f"{eager_s:.{1 if eager_s < 10 else 0}f} s cannot repay compiling")
    try:
        compiled = measure({f"{precision}+{mode}": path(bf16, mode) for mode in modes})
    except Exception as exc:  # a compiler error: say it, train eagerly
        return chosen(bf16, reason, rates, None, f"compile=auto: compiling failed ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}): trained eagerly")
    rates |= compiled.rates
    total = {mode: compiled.setup_s[f"{precision}+{mode}"] + steps * n / rates[f"{precision}+{mode}"]
             for mode in modes}
    best = min(total, key=total.get)
    setup = compiled.setup_s[f"{precision}+{best}"]
    how = (f"{rates[f'{precision}+{best}']:,.0f} img/s compiled ({best}) after {setup:.0f} s of compiling: "
           f"about {total[best]:.0f} s for the stage against {eager_s:.0f} s eager")
    if total[best] < eager_s:
        return chosen(bf16, reason, rates, best, f"compile=auto: {how}", setup)
    return chosen(bf16, reason, rates, None, f"compile=auto: {how}; trained eagerly", setup)


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
