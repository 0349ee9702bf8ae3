"""The three stages, each an MLflow run, described by one table and run by one function.

``baseline``  train from scratch with cross-entropy
``teach``     train a teacher against a frozen student fetched from the registry
``distill``   distil a student from a frozen teacher fetched from the registry

``teach`` and ``distill`` are one mechanism with two roles: a trained network, a frozen
partner and an objective from ``ttkd.kd``. Every stage checks all its inputs (data set,
architecture, partner, method, model name) before it opens a run, and writes to the
registry only after training finished.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from tqdm import tqdm

from ttkd import attempts, calibration, cost, distributed, kd, models, registry, serving, tracking
from ttkd import data as datasets
from ttkd.config import PARAMS, RunConfig, check_processes, check_resume
from ttkd.engine import (
    EpochStats,
    Interrupted,
    NonFiniteLoss,
    StepChoice,
    TrainConfig,
    accuracy,
    bf16_supported,
    check_batch,
    choose_step,
    fit,
    predict,
    resolve_device,
    seed_everything,
    set_deterministic,
)
from ttkd.errors import TTKDError
from ttkd.registry import ModelRef

log = logging.getLogger(__name__)  # shown by the entry points (entry/options.py)

TAG_STAGE = "ttkd.stage"
TAG_PARTNER = registry.TAG_PARTNER
TAG_METHOD = "ttkd.method"
TAG_PRECISION = "ttkd.precision"
TAG_COMPILE = "ttkd.compile"  # the torch.compile mode of the training step, or "eager"
TAG_UNRESUMABLE = "ttkd.unresumable"  # why resume=last passes a run by (its checkpoint is damaged)
# tests only: seconds each epoch waits after its metrics, so that a test on a real cluster sees a
# run mid-way whatever the machine's speed (set in the environment of the nodes' processes)
TEST_EPOCH_DELAY = "TTKD_TEST_EPOCH_DELAY_S"
# tests only: once the file this names exists, the next epoch to finish removes it and stops its
# own process (SIGSTOP) right after its writes: a node cut off at a known point of its work
TEST_FREEZE_FILE = "TTKD_TEST_FREEZE_FILE"
TAG_PARTNER_DATA = "ttkd.partner_data"  # "foreign": the partner was trained on another data set (partner_data=any)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    partner: str | None   # the role of the frozen partner it fetches, if any
    role: str             # which methods it runs (ttkd.kd roles)


STAGES = {"baseline": Stage("baseline", None, "baseline"),
          "teach": Stage("teach", "student", "teach"),
          "distill": Stage("distill", "teacher", "distill")}


@dataclasses.dataclass(frozen=True)
class StageResult:
    run_id: str
    model: ModelRef            # the registered version this stage made
    val_acc: float             # of the registered (last-epoch) weights, percent
    agreement: float | None    # top-1 agreement with the partner, percent
    partner: ModelRef | None
    partner_val_acc: float | None


def default_method_params(method: str) -> dict:
    """The method's hyper-parameters at their defaults (``ttkd.config``'s table)."""
    return {n: PARAMS[n].default for n in kd.get(method).params}


def baseline(*, arch: str, train: TrainConfig, dataset: str = "digits",
             data_dir: str | None = None, stream: bool | None = None, register_as: str | None = None,
             **run) -> StageResult:
    """Train ``arch`` from scratch with cross-entropy; register it as ``register_as``
    (default ``DATASET-ARCH``). ``run``: ``run_stage``'s ``tags``, ``parent_run_id``, ``resume_from``."""
    return run_stage("baseline", arch=arch, train=train, partner=None, method="ce", method_params={},
                     dataset=dataset, data_dir=data_dir, stream=stream,
                     register_as=register_as or f"{dataset}-{arch}", **run)


def teacher_kind(weight: float) -> str:
    """``trained`` (w > 0), ``normal`` (w = 0) or ``nasty`` (w < 0)."""
    return "trained" if weight > 0 else "normal" if weight == 0 else "nasty"


def teach(*, student: str, arch: str, train: TrainConfig, weight: float = 0.005,
          temperature: float = 4.0, dataset: str = "digits", data_dir: str | None = None,
          stream: bool | None = None, register_as: str | None = None, **run) -> StageResult:
    """Train teacher ``arch`` against the frozen ``student`` (a model reference) with
    CE + weight·T²·KL(teacher ‖ student); register it (default ``DATASET-ARCH-KIND``,
    KIND trained / normal / nasty for weight > 0 / = 0 / < 0)."""
    kind = teacher_kind(weight)
    return run_stage("teach", arch=arch, train=train, partner=student, method="teach",
                     method_params={"weight": weight, "temperature": temperature},
                     dataset=dataset, data_dir=data_dir, stream=stream,
                     register_as=register_as or f"{dataset}-{arch}-{kind}", **run)


def distill(*, teacher: str, arch: str, train: TrainConfig, method: str = "kd",
            method_params: dict | None = None, dataset: str = "digits", data_dir: str | None = None,
            stream: bool | None = None, register_as: str | None = None, **run) -> StageResult:
    """Distil student ``arch`` from the frozen ``teacher`` (a model reference) with
    ``method`` (``ttkd.kd``; its hyper-parameters in ``method_params``, the defaults where
    missing); register it (default ``DATASET-ARCH-kd``, or ``DATASET-ARCH-METHOD``)."""
    kd.get(method)
    params = default_method_params(method) | (method_params or {})
    return run_stage("distill", arch=arch, train=train, partner=teacher, method=method,
                     method_params=params, dataset=dataset, data_dir=data_dir, stream=stream,
                     register_as=register_as or f"{dataset}-{arch}-{method}", **run)


class StageInterrupted(TTKDError):
    """A stage stopped by SIGINT or SIGTERM; its run is marked KILLED and can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NoCheckpoint(TTKDError):
    """A run to resume stopped before its first checkpoint."""


def shapes(net: torch.nn.Module, image_shape) -> kd.Shapes:
    """A network's stage-map shapes and embedding width, from one dummy batch."""
    was_training = net.training
    with torch.no_grad():
        dummy = torch.zeros(2, *image_shape, device=next(net.parameters()).device)
        maps, embedding = net.eval().forward_stages(dummy)
    net.train(was_training)
    return kd.Shapes(tuple(tuple(m.shape[1:]) for m in maps), embedding.shape[1])


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
    data = data or datasets.load(setup.dataset, setup.data_dir, setup.stream)
    check_batch(len(data.train_y), len(data.val_y), setup.train.batch_size, distributed.size())
    set_deterministic(setup.train.deterministic)
    seed_everything(setup.train.seed)
    model = models.build(setup.arch, data.num_classes, data.in_channels, image_size=data.image_shape[-1])
    partner_net = None
    if setup.partner_arch is not None:
        partner_net = models.build(setup.partner_arch, data.num_classes, data.in_channels,
                                   image_size=data.image_shape[-1])
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
        fit(model, data, objective, setup.train, partner=partner_net,
            resume=setup.ckpt["engine"] if setup.ckpt else None, stop=stop)


FOLLOWER_STOPS = (Interrupted, NonFiniteLoss)  # stops every process agrees on: the stage ends, not the job


def run_stage(stage: str, *, arch: str, train: TrainConfig, partner: str | None, method: str,
              method_params: dict, dataset: str, data_dir: str | None, stream: bool | None,
              register_as: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
              resume_from: tuple[str, dict] | None = None, partner_data: str = "same",
              trust_unverified: bool = False, attempt: attempts.Token | None = None) -> StageResult:
    """Run ``stage`` (a name in ``STAGES``): train ``arch`` with ``method`` beside the
    frozen ``partner`` reference (trained on this stage's data set unless ``partner_data``
    is ``any``; its files verified against the registry's digests unless ``trust_unverified``),
    log everything to an MLflow run and register the result as ``register_as``.
    ``tags`` go on the run and on the registered version; the run is a child of
    ``parent_run_id`` (or of the active run) if given. ``resume_from`` = (run id,
    checkpoint) continues that run. ``attempt`` is this try's token (``ttkd.attempts``;
    given by a sweep, else the run's next): a newer attempt at the run stops this one
    before its next write. In a process group this is the leader's part; the followers
    train alongside in :func:`follow_stage`."""
    spec = STAGES[stage]
    world = distributed.world()
    # Everything a user can get wrong is checked here, before a run is opened.
    registry.check_model_name(register_as)
    registry.prepare_store()
    device = stage_device(train.device)
    kd.get(method, spec.role)
    check_processes((method,), several=world is not None)
    setup = Setup(stage, arch, train, method, method_params, dataset, data_dir, stream,
                  ckpt=resume_from[1] if resume_from else None)
    data = datasets.load(dataset, data_dir, stream)
    partner_ref = found = None
    if partner is not None:
        partner_ref = registry.resolve(partner)  # pinned to one version for every process
        with tempfile.TemporaryDirectory() as tmp:
            found = tracking.load_partner(partner_ref, data, spec.partner, tmp, partner_data, trust_unverified)
        if found.unverified:
            log.warning(found.unverified)
        if found.unchecked:
            log.warning(found.unchecked)
        if found.foreign:
            log.info("partner_data=any: %s", found.foreign)
        setup = dataclasses.replace(setup, partner_arch=found.arch, partner_state=found.net.state_dict())
    data, model, partner_net, objective = build(setup, data)
    data = data.to(device)
    model.to(device)
    if partner_net is not None:
        partner_net.to(device)
    ckpt = setup.ckpt
    if ckpt is None:
        choice = choose_step(model, data, objective, train, partner_net)
    else:  # a resumed run keeps the step it started with (its checkpoint has it resolved)
        choice = StepChoice(bool(train.amp), f"as run {resume_from[0]} started", {}, train.compile or None,
                            f"as run {resume_from[0]} started")
    log.info(step_line(choice, device))
    used = dataclasses.replace(train, amp=choice.bf16, compile=choice.compile or False)
    setup = dataclasses.replace(setup, train=used)
    # what resuming needs to rebuild this stage exactly: the partner pinned to its version
    kwargs = {"arch": arch, "dataset": dataset, "data_dir": data_dir, "stream": stream,
              "register_as": register_as, "train": dataclasses.asdict(used), "method": method,
              "method_params": method_params, "partner": partner_ref.uri if partner_ref else None,
              "partner_data": partner_data, "trust_unverified": trust_unverified, "tags": tags or {}}
    if world is not None:
        distributed.lead(setup)

    if resume_from:
        run = mlflow.start_run(run_id=resume_from[0], nested=mlflow.active_run() is not None)
    else:
        run = mlflow.start_run(nested=mlflow.active_run() is not None, run_name=f"{stage} {arch}",
                               parent_run_id=parent_run_id)
    status = "FAILED"
    fence = None
    try:
        fence = attempts.begin(run.info.run_id, parent_id=parent_run_id or run.data.tags.get(MLFLOW_PARENT_RUN_ID),
                               point=(tags or {}).get(attempts.POINT_TAG), token=attempt, fresh=ckpt is None)
        if ckpt is None:
            run_tags = {TAG_STAGE: stage, TAG_METHOD: method} | (tags or {})
            if partner_ref is not None:
                run_tags[TAG_PARTNER] = partner_ref.uri
            if found is not None and found.foreign:
                run_tags[TAG_PARTNER_DATA] = "foreign"
            if found is not None and found.unverified:
                run_tags[tracking.TAG_TRUSTED] = partner_ref.uri
            mlflow.set_tags(run_tags | {tracking.TAG_STAGE_ARGS: json.dumps(kwargs, sort_keys=True)})
            tracking.log_params({
                "dataset": dataset, "data_dir": data_dir or "", "stream": STREAM_WORDS[stream],
                "streamed": data.streamed, "arch": arch,
                "register_as": register_as, **dataclasses.asdict(train),
                **({"method": method} if stage == "distill" else {}), **method_params,
                **({spec.partner: partner, "partner_data": partner_data, "trust_unverified": trust_unverified}
                   if partner else {}),
                "num_params": models.num_parameters(model), "device_used": str(device),
                "world_size": distributed.size(),
            })
            tracking.log_dataset(data)
            mlflow.set_tags({TAG_PRECISION: "bf16" if choice.bf16 else "float32",
                             "ttkd.precision_reason": choice.reason, TAG_COMPILE: choice.compile or "eager",
                             "ttkd.compile_reason": choice.compile_reason[:5000]})
            mlflow.log_metrics({f"calibration_{name.replace('+', '_compiled_')}_img_s": rate
                                for name, rate in choice.rates.items()}
                               | ({"calibration_compile_s": choice.compile_s} if choice.compile_s is not None else {}))
        else:
            mlflow.set_tags((tags or {}) | {"ttkd.resumed_after_epoch": str(ckpt["epoch"])})
            before = ckpt["engine"].get("world_size", 1)
            log.info(f"resuming run {run.info.run_id} after epoch {ckpt['epoch']}"
                     + (f", with {_processes(distributed.size())} instead of {before}"
                        if before != distributed.size() else ""))

        partner_acc = None
        if partner_net is not None:
            partner_acc = accuracy(predict(partner_net, data, train.batch_size), data.val_y)
            log.info(f"{spec.partner} {partner_ref.uri}: val_acc {partner_acc:.2f}%")

        last = dict(ckpt["stats"]) if ckpt else None
        if ckpt is not None:  # killed between its checkpoint and its metrics: log them now
            logged = {m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")}
            if ckpt["epoch"] not in logged:
                tracking.log_epoch(EpochStats(**last), partner_acc)
        best = [ckpt["best_val_acc"] if ckpt else -1.0]
        written = tracking.checkpoint_digests(run.info.run_id) if ckpt else {}  # the run's checkpoints' SHA-256
        with tempfile.TemporaryDirectory() as tmp, stop_on_signals() as stop:
            def on_epoch(s: EpochStats, engine: dict) -> None:
                fence.check()  # a newer attempt at this run (a retry elsewhere) writes from now on
                if ckpt is None and s.epoch == 1 and choice.key:  # the figures that chose the step, checked
                    chosen = ("bf16" if choice.bf16 else "float32") + (f"+{choice.compile}" if choice.compile else "")
                    if calibration.recheck(choice.key, chosen, s.throughput):
                        log.warning(f"the cached calibration of {chosen} ({choice.rates[chosen]:,.0f} img/s) is "
                                    f"far below what epoch 1 trained at ({s.throughput:,.0f} img/s): it was measured "
                                    f"while the machine was busy; dropped, the next stage measures again")
                best[0] = max(best[0], s.val_acc)
                state = {"format": tracking.CHECKPOINT_FORMAT,
                         "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                         "engine": engine, "stage": stage,
                         "arch": arch, "num_classes": data.num_classes,
                         "image_shape": list(data.image_shape), "epoch": s.epoch,
                         "val_acc": s.val_acc, "best_val_acc": best[0],
                         "stats": dataclasses.asdict(s)}
                files = [Path(tmp) / "last.pt"] + ([Path(tmp) / "best.pt"] if s.val_acc == best[0] else [])
                for file in files:
                    tracking.save_checkpoint(file, state)
                tracking.log_checkpoints(files, written)
                # metrics after the checkpoint: an epoch with metrics always has its checkpoint
                tracking.log_epoch(s, partner_acc)
                log.info(summary(s, train.epochs))
                time.sleep(float(os.environ.get(TEST_EPOCH_DELAY, "0")))
                freeze = os.environ.get(TEST_FREEZE_FILE)
                if freeze and os.path.exists(freeze):
                    os.remove(freeze)
                    os.kill(os.getpid(), signal.SIGSTOP)

            try:
                history = fit(model, data, objective, used, partner=partner_net, on_epoch=on_epoch,
                              resume=ckpt["engine"] if ckpt else None, stop=stop, progress=progress_bar)
            except Interrupted as exc:
                distributed.done()
                status = "KILLED"
                name = signal.Signals(exc.signum).name
                where = "" if stop.signum else " (sent to another process of this stage)"
                raise StageInterrupted(
                    f"stopped by {name}{where} in epoch {exc.epoch}; run {run.info.run_id} is marked "
                    f"KILLED and keeps its last finished epoch: continue it with resume={run.info.run_id}",
                    exc.signum) from None
            except NonFiniteLoss:
                distributed.done()
                raise
            except RuntimeError as exc:
                if world is None:
                    raise
                raise distributed.Lost(
                    f"another process of this stage stopped ({_first_line(exc)}); run {run.info.run_id} "
                    f"is marked FAILED and keeps its last finished epoch: continue it with "
                    f"resume={run.info.run_id}") from None
            distributed.done()
        if history:
            last = dataclasses.asdict(history[-1])
        mlflow.log_metric("best_val_acc", best[0])

        measured = {}  # what the served network costs, measured on it before it is logged

        def measure(path: Path) -> None:  # (and, trained on a GPU, the network there)
            start = time.perf_counter()
            on_cuda = (copy.deepcopy(model).eval().to(device), device) if device.type == "cuda" else None
            served = serving.load_network(str(path), data.image_shape, data.num_classes, threads=tracking.COST_THREADS)
            measured["cost"] = cost.measure(model, served, data.image_shape, path.stat().st_size,
                                            threads=tracking.COST_THREADS, on_cuda=on_cuda)
            measured["seconds"] = time.perf_counter() - start
        fence.check()
        info, digests = tracking.log_model(model, data, arch, on_export=measure)
        mlflow.log_metrics(measured["cost"].metrics() | {"cost_measure_s": measured["seconds"]})
        mlflow.set_tag(tracking.TAG_DIGESTS, json.dumps(digests, sort_keys=True))
        version_tags = {TAG_STAGE: stage, TAG_METHOD: method, "ttkd.dataset": dataset, "ttkd.arch": arch,
                        tracking.TAG_DIGESTS: json.dumps(digests, sort_keys=True),
                        **tracking.cost_tags(measured["cost"]), **(tags or {})}
        if partner_ref is not None:
            version_tags[TAG_PARTNER] = partner_ref.uri
        if found is not None and found.foreign:
            version_tags[TAG_PARTNER_DATA] = "foreign"
        if found is not None and found.unverified:
            version_tags[tracking.TAG_TRUSTED] = partner_ref.uri
        ref = attempts.register_once(fence, info.model_uri, register_as, version_tags)
        mlflow.set_tag("ttkd.registered_model", ref.uri)
        log.info(f"registered {ref.uri} (val_acc {last['val_acc']:.2f}%, run {run.info.run_id})")
        status = "FINISHED"
    finally:
        if fence is not None and fence.current():
            mlflow.end_run(status)
        else:  # a newer attempt owns the run (or this one could not claim it): its state is not ours
            tracking.leave_run()
    return StageResult(run.info.run_id, ref, last["val_acc"], last["agreement"], partner_ref, partner_acc)


def step_line(c: StepChoice, device: torch.device) -> str:
    """One line for the terminal: the precision a stage trains in, whether its step is
    compiled, and why."""
    rates = ", ".join(f"{name} {rate:,.0f} img/s" for name, rate in sorted(c.rates.items()) if "+" not in name)
    why = {"measured": f"amp=auto, measured: {rates}", "cached": f"amp=auto, measured before: {rates}",
           "no native bf16": f"amp=auto: this {device.type.upper()} has no native bf16"}.get(c.reason, c.reason)
    if c.bf16 and not bf16_supported(device):
        why += f"; emulated: this {device.type.upper()} has no native bf16, so it is slower"
    compiled = f"on, {c.compile}" if c.compile else "off"
    return f"precision: {'bf16' if c.bf16 else 'float32'} ({why}); compile: {compiled} ({c.compile_reason})"


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n > 1 else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:200] if text else type(exc).__name__


STREAM_WORDS = {None: "auto", True: "true", False: "false"}


def summary(s: EpochStats, epochs: int) -> str:
    """One line per epoch for the terminal."""
    parts = " ".join(f"{k} {v:.4f}" for k, v in s.train.items() if k != "loss")
    agree = f"  agreement {s.agreement:.1f}%" if s.agreement is not None else ""
    return (f"epoch {s.epoch:>3}/{epochs}  loss {s.train['loss']:.4f} ({parts})  "
            f"val_loss {s.val_loss:.4f}  val_acc {s.val_acc:.2f}%{agree}  "
            f"lr {s.lr:.4g}  {s.throughput:,.0f} img/s")


def progress_bar(batches, total: int, label: str):
    """A progress bar on a terminal's stderr; nothing when stderr is not a terminal."""
    return tqdm(batches, total=total, desc=label, leave=False, disable=not sys.stderr.isatty())


class stop_on_signals:
    """While active, SIGINT and SIGTERM ask training to stop after the current step
    (a second signal stops at once); calling the object returns the signal that came (0: none).
    ``forward(signum)``, if given, is called with the first one (a sweep passes it on to
    its workers). A signal taken by an enclosing block, or noted by ``note_signal`` while
    no block was active, counts for the blocks entered after it: a stage started after
    the stop request stops at its first step."""

    pending: int | None = None  # the stop request this process has received, if any
    _depth = 0

    def __init__(self, forward: Callable[[int], None] | None = None):
        self.signum = None
        self.forward = forward
        self._old = {}

    def __call__(self) -> int:
        return self.signum or 0

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = stop_on_signals.pending = signum
        if self.forward:
            self.forward(signum)

    def __enter__(self):
        self.signum = stop_on_signals.pending
        stop_on_signals._depth += 1
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        stop_on_signals._depth -= 1
        if stop_on_signals._depth == 0 and not note_signal.installed:
            stop_on_signals.pending = None  # handled: the next command starts afresh
        return False


def note_signal(signum, frame) -> None:
    """A handler for SIGINT and SIGTERM between stages (a sweep's worker): remember the
    stop request for the next ``stop_on_signals`` block."""
    stop_on_signals.pending = signum


note_signal.installed = False  # set where note_signal is the process's handler


def resume(stage: str, reference: str, cfg: RunConfig | None = None,
           tags: dict[str, str] | None = None, attempt: attempts.Token | None = None) -> StageResult:
    """Continue an unfinished ``stage`` run (its id, or ``last`` for the newest one) from
    its last checkpoint, in the same MLflow run; the values ``cfg`` was given must be the
    run's own. ``tags`` (where it trains now) are added to the run's and its version's;
    ``attempt``: as in :func:`run_stage`."""
    registry.prepare_store()
    client = MlflowClient()
    run = unfinished_run(stage, reference)
    run_id = run.info.run_id
    if cfg is not None:
        check_resume(cfg, run_id, run.data.params)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ckpt = tracking.download_checkpoint(run_id, tmp)
        except tracking.DamagedCheckpoint as exc:  # never again the newest run to resume
            client.set_tag(run_id, TAG_UNRESUMABLE, "damaged checkpoint")
            raise tracking.DamagedCheckpoint(f"{exc}; resume=last skips this run from now on") from None
    if ckpt is None:
        raise NoCheckpoint(f"run {run_id} has no checkpoint (it stopped in its first epoch); "
                           f"start the stage again without resume")
    if ckpt.get("format") != tracking.CHECKPOINT_FORMAT or ckpt.get("stage") != stage:
        raise TTKDError(f"the checkpoint of run {run_id} cannot be resumed (made by another version "
                        f"of ttkd or another stage); start the stage again")
    if os.environ.get("MLFLOW_RUN_ID") and mlflow.active_run() is None:
        # started by `mlflow run`: point its run at the real one
        client.set_tag(os.environ["MLFLOW_RUN_ID"], "ttkd.resumes_run", run_id)
    try:  # the run's own record, in the tracking store: never what its checkpoint file says
        kw = json.loads(run.data.tags[tracking.TAG_STAGE_ARGS])
    except (KeyError, ValueError):
        raise TTKDError(f"run {run_id} has no record of its stage's arguments (started by an older ttkd); "
                        f"start the stage again") from None
    return run_stage(stage, arch=kw["arch"], train=train_config(kw["train"]), partner=kw["partner"],
                     method=kw["method"], method_params=kw["method_params"], dataset=kw["dataset"],
                     data_dir=kw["data_dir"], stream=kw["stream"], register_as=kw["register_as"],
                     tags=(kw.get("tags") or {}) | (tags or {}), resume_from=(run_id, ckpt),
                     partner_data=kw.get("partner_data", "same"), trust_unverified=kw.get("trust_unverified", False),
                     attempt=attempt)


def unfinished_run(stage: str, reference: str):
    """The unfinished ``stage`` run named by ``reference`` (a run id, or ``last``)."""
    if reference == "last":  # in this experiment only: on a shared server, others' runs are elsewhere
        experiment = mlflow.get_experiment(tracking.use_experiment(""))
        runs = [r for r in mlflow.search_runs([experiment.experiment_id], output_format="list",
                                              filter_string=f"tags.`{TAG_STAGE}` = '{stage}'",
                                              order_by=["attributes.start_time DESC"], max_results=50)
                if r.info.status != "FINISHED" and TAG_UNRESUMABLE not in r.data.tags]
        if not runs:
            raise TTKDError(f"no unfinished {stage} run to resume in experiment {experiment.name!r}; "
                            f"start one without resume, or give the experiment it ran in (experiment=NAME)")
        started = datetime.datetime.fromtimestamp(runs[0].info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        log.info(f"resume=last: run {runs[0].info.run_id} ({runs[0].info.run_name}, {runs[0].info.status}, "
                 f"started {started}) in experiment {experiment.name!r}")
        return runs[0]
    try:
        run = MlflowClient().get_run(reference)
    except MlflowException:
        raise TTKDError(f"no run with id {reference!r}; give a run id from mlflow ui, or last") from None
    if run.data.tags.get(TAG_STAGE) != stage:
        raise TTKDError(f"run {run.info.run_id} is a {run.data.tags.get(TAG_STAGE, 'non-ttkd')} run; "
                        f"resume it with its own entry point")
    if run.info.status == "FINISHED":
        raise TTKDError(f"run {run.info.run_id} has finished; there is nothing to resume")
    return run


def train_config(values: dict) -> TrainConfig:
    """A TrainConfig from its dict form (as checkpoints and study.json keep it)."""
    return TrainConfig(**(values | {"milestones": tuple(values["milestones"])}))
