"""A stage's networks and objective, built alike in every process of a group.

The leader of a stage (``ttkd.stages.prepare``) reads the registry and the checkpoint and
makes a :class:`Setup`; in a process group it sends it to the followers, which build the
same networks, objective and step from it (:func:`follow_stage`) and never open a run nor
read the registry.
"""

from __future__ import annotations

import dataclasses

import torch

from ttkd import data as datasets
from ttkd import distributed, kd, models
from ttkd.config import TrainConfig
from ttkd.engine import Interrupted, NonFiniteLoss, check_batch, fit, seed_everything, set_deterministic
from ttkd.signals import stop_on_signals
from ttkd.step import Step, resolve_device


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    partner: str | None   # the role of the frozen partner it fetches, if any
    role: str             # which methods it runs (ttkd.kd roles)


STAGES = {"baseline": Stage("baseline", None, "baseline"),
          "teach": Stage("teach", "student", "teach"),
          "distill": Stage("distill", "teacher", "distill")}


def shapes(net: torch.nn.Module, image_shape) -> kd.Shapes:
    """A network's stage-map shapes and embedding width, from one dummy batch."""
    was_training = net.training
    with torch.no_grad():
        dummy = torch.zeros(2, *image_shape, device=next(net.parameters()).device)
        maps, embedding = net.eval().forward_stages(dummy)
    net.train(was_training)
    return kd.Shapes(tuple(tuple(m.shape[1:]) for m in maps), embedding.shape[1])


def network(arch: str, data) -> torch.nn.Module:
    """A fresh ``arch`` for ``data``'s images and classes."""
    return models.build(arch, data.num_classes, data.in_channels, image_size=data.image_shape[-1])


def build_method(method: str, role: str, data, model: torch.nn.Module, partner: torch.nn.Module | None,
                 params: dict, model_arch: str = "", partner_arch: str = "") -> torch.nn.Module:
    """The ``ttkd.kd`` objective ``method`` for ``model`` beside ``partner`` on ``data``;
    a features method gets both networks' stage shapes (and refuses networks it cannot pair)."""
    features = kd.get(method, role).features
    context = kd.Context(
        num_classes=data.num_classes, train_labels=data.train_y.cpu(), model_arch=model_arch,
        partner_arch=partner_arch,
        model=shapes(model, data.image_shape) if features else None,
        partner=shapes(partner, data.image_shape) if features else None)
    return kd.build(method, context, role, **params)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every process needs to build one stage's training alike. The leader makes
    it (it reads the registry and the checkpoint); in a process group it sends it to the
    followers, which never open a run nor read the registry."""

    stage: str
    arch: str
    train: TrainConfig
    method: str
    method_params: dict
    dataset: str
    data_dir: str | None
    stream: bool | None
    partner_arch: str | None = None
    partner_state: dict | None = None  # the pinned partner version's weights
    ckpt: dict | None = None           # the checkpoint a resumed run continues from
    step: Step = Step()                # how the step runs, chosen once by the leader (prepare)
    holdout: float = 0.0               # the fraction of the training split it is evaluated on (a trial)


def stage_device(name: str) -> torch.device:
    """The training device: ``name``, or in a process group on GPUs this process's own GPU."""
    device = resolve_device(name)
    world = distributed.world()
    if world is not None and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    return device


def build(setup: Setup, data: datasets.ImageData | None = None):
    """``(data, model, partner, objective)`` for ``setup``, seeded so that every process
    builds the same: the partner rebuilt from ``setup``'s weights, a resumed model with its
    checkpoint's weights; ``data`` if it was loaded already. Nothing is on the device yet."""
    spec = STAGES[setup.stage]
    if data is None:
        data = datasets.load(setup.dataset, setup.data_dir, setup.stream)
        data = data.holdout(setup.holdout) if setup.holdout else data
    check_batch(len(data.train_y), len(data.val_y), setup.train.batch_size, distributed.size())
    set_deterministic(setup.train.deterministic)
    seed_everything(setup.train.seed)
    model = network(setup.arch, data)
    partner_net = None
    if setup.partner_arch is not None:
        partner_net = network(setup.partner_arch, data)
        partner_net.load_state_dict(setup.partner_state)
        partner_net.eval()
    objective = build_method(setup.method, spec.role, data, model, partner_net, setup.method_params,
                             setup.arch, setup.partner_arch or "")
    if setup.ckpt is not None:
        model.load_state_dict(setup.ckpt["model"])
    return data, model, partner_net, objective


def follow_stage(setup: Setup) -> None:
    """A follower's part of a stage: train beside the leader, and nothing else."""
    device = stage_device(setup.train.device)
    data, model, partner_net, objective = build(setup)
    data, model = data.to(device), model.to(device)
    if partner_net is not None:
        partner_net.to(device)
    with stop_on_signals() as stop:
        fit(model, data, objective, setup.train, partner=partner_net, step=setup.step,
            resume=setup.ckpt["engine"] if setup.ckpt else None, stop=stop)


FOLLOWER_STOPS = (Interrupted, NonFiniteLoss)  # stops every process agrees on: the stage ends, not the job
