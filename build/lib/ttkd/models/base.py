"""The registry of architectures and the ``Classifier`` every model is; the package's
docstring says it in full."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ttkd.errors import TTKDError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module], name: str | None = None) -> Callable[..., nn.Module]:
    """Register a constructor under ``name`` (default: its function name); usable as a decorator."""
    _REGISTRY[name or fn.__name__] = fn
    return fn


def names() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get(arch: str) -> Callable[..., nn.Module]:
    """The constructor registered as ``arch``; an unknown name lists the known ones."""
    if arch not in _REGISTRY:
        raise TTKDError(f"unknown architecture {arch!r}; choose one of: {', '.join(names())}")
    return _REGISTRY[arch]


def build(arch: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """A freshly initialised ``arch`` for ``num_classes`` classes and ``in_channels`` inputs."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return get(arch)(num_classes=num_classes, in_channels=in_channels, **kwargs)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Classifier(nn.Module):
    """``features`` then ``head``: the split every ttkd model follows.

    ``stage_ends`` are the indices of the ``features`` layers whose outputs are the
    stage maps; the last layer of ``features`` gives the pooled ``(B, D)`` embedding.
    """

    def __init__(self, features: nn.Sequential, head: nn.Module, stage_ends: Sequence[int]):
        super().__init__()
        self.features = features
        self.head = head
        self.stage_ends = tuple(i % len(features) for i in stage_ends)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(stage maps, embedding)``: each stage's output ``(B, C_i, H_i, W_i)``, shallow
        to deep (a vector output as ``(B, D, 1, 1)``), and the pooled ``(B, D)`` embedding."""
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.stage_ends:
                maps.append(x if x.dim() == 4 else x[:, :, None, None])
        return maps, x
