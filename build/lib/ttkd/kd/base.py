"""The contract of a training objective (``Context``, ``Batch``), its registry, and the
KL term most methods share; the package's docstring says it in full."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ttkd import config
from ttkd.config import Param
from ttkd.errors import TTKDError


@dataclasses.dataclass(frozen=True)
class Shapes:
    """A network's stage maps ``(C, H, W)``, shallow to deep, and its embedding width D."""

    stages: tuple[tuple[int, int, int], ...]
    embedding: int


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method may need to build itself."""

    num_classes: int
    train_labels: torch.Tensor        # (N,) labels of the training split, on the CPU
    model: Shapes | None = None       # the trained network (features methods only)
    partner: Shapes | None = None     # the frozen partner (features methods only)
    model_arch: str = ""              # for error messages
    partner_arch: str = ""


@dataclasses.dataclass
class Batch:
    """One training step as a method sees it; every tensor is float32 except labels/index."""

    logits: torch.Tensor                        # (B, K) of the network being trained
    labels: torch.Tensor                        # (B,)
    epoch: int | torch.Tensor                   # 1-based; from the engine a 0-d float32 tensor on the device
    index: torch.Tensor | None = None           # (B,) positions in the training split
    partner_logits: torch.Tensor | None = None  # (B, K), no gradient
    stages: list[torch.Tensor] | None = None    # (B, C_i, H_i, W_i), features methods only
    embedding: torch.Tensor | None = None       # (B, D)
    partner_stages: list[torch.Tensor] | None = None
    partner_embedding: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    build: Callable[..., nn.Module]  # (context, **params) -> module
    params: tuple[str, ...]          # its hyper-parameters' names (the run parameters it reads)
    role: str                        # "distill", "teach" or "baseline"
    features: bool                   # whether it reads stage maps and embeddings
    summary: str


_REGISTRY: dict[str, Spec] = {}


def register(name: str, *, params: tuple[str | Param, ...] = (), role: str = "distill", features: bool = False):
    """Class decorator: register a method under ``name``; its first docstring line is its summary.
    ``params``: the keyword arguments it is built with, each a run parameter: its own declared
    here as a ``Param`` (type, default, meaning, bounds; they join ``ttkd.config``'s table and the
    parameter reference), the table's shared ones (alpha, temperature, weight) by name."""
    names = config.declare_method(name, params)

    def apply(cls):
        summary = (cls.__doc__ or name).strip().splitlines()[0]
        _REGISTRY[name] = Spec(name, cls, names, role, features, summary)
        cls.features = features  # what the engine reads to decide what to compute
        return cls
    return apply


def names(role: str = "distill") -> list[str]:
    """The registered methods of ``role``, in registration order."""
    return [s.name for s in _REGISTRY.values() if s.role == role]


def get(name: str, role: str = "distill") -> Spec:
    spec = _REGISTRY.get(name)
    if spec is None or spec.role != role:
        raise TTKDError(f"unknown method {name!r}; choose one of: {', '.join(names(role))}")
    return spec


def build(name: str, context: Context, role: str = "distill", **params) -> nn.Module:
    """The method ``name`` for ``context`` with ``params`` (each one it declares)."""
    spec = get(name, role)
    return spec.build(context, **{k: params[k] for k in spec.params})


def soft_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(p_logits/T) ‖ softmax(q_logits/T)), averaged over the batch.

    The T² factor keeps the gradient's scale independent of T (Hinton et al., 2015).
    """
    log_p = torch.log_softmax(p_logits / temperature, dim=1)
    log_q = torch.log_softmax(q_logits / temperature, dim=1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
