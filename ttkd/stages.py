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
import json
import logging
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ttkd import callbacks as callbacks_
from ttkd import console, cost, distributed, kd, models, serving, tracking
from ttkd import data as datasets
from ttkd.build import STAGES, Setup, Stage, build, stage_device
from ttkd.callbacks import TEST_EPOCH_DELAY, TEST_FREEZE_FILE, Callback  # noqa: F401 (tests set them)
from ttkd.choice import StepChoice, choose_step
from ttkd.config import PARAMS, TrainConfig, check_processes
from ttkd.engine import EpochStats, Interrupted, NonFiniteLoss, accuracy, fit, predict
from ttkd.errors import TTKDError
from ttkd.signals import stop_on_signals
from ttkd.step import Step, bf16_supported
from ttkd.tracking import attempts, modelstore, registry
from ttkd.tracking.registry import ModelRef

log = logging.getLogger(__name__)  # shown by the entry points (entry/options.py)

TAG_STAGE = "ttkd.stage"
TAG_PARTNER = registry.TAG_PARTNER
TAG_METHOD = "ttkd.method"
TAG_PRECISION = "ttkd.precision"
TAG_COMPILE = "ttkd.compile"  # the torch.compile mode of the training step, or "eager"
TAG_PARTNER_DATA = "ttkd.partner_data"  # "foreign": the partner was trained on another data set (partner_data=any)


@dataclasses.dataclass(frozen=True)
class StageResult:
    run_id: str
    model: ModelRef | None     # the registered version this stage made (None: a search's trial registers none)
    val_acc: float             # of the last epoch's weights (the registered ones), percent, on ``split``
    agreement: float | None    # top-1 agreement with the partner, percent, on ``split``
    partner: ModelRef | None
    partner_val_acc: float | None
    split: str = "val"         # what val_acc was measured on: the validation split, or the holdout


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


def trial(*, stage: str, **kw) -> StageResult:
    """A search's trial: ``stage`` (baseline or distill) with ``run_stage``'s arguments ``kw``,
    evaluated on its ``holdout`` of the training split; it logs no model and registers nothing.
    ``teach``: :func:`teacher_trial`."""
    if stage == "teach":
        return teacher_trial(**kw)
    return run_stage(stage, register_as=None, **kw)


TAG_TRIAL_TEACHER = "ttkd.trial_teacher"  # a teacher search's KD trial: the run of the teacher it distilled from


def teacher_trial(*, teach: dict, distill: dict, parent_run_id: str, callbacks: Sequence[Callback] = (),
                  attempt: attempts.Token | None = None) -> StageResult:
    """A teacher search's trial: a teacher trained against its frozen student (``teach``:
    ``run_stage``'s arguments), then a KD student distilled from that teacher as it stands in
    memory (``distill``), both on the holdout split; the trial's value is the KD student's. The
    teacher is neither logged as a model nor registered, so an interrupted trial starts again
    from its teacher. ``callbacks`` (a pruner) follow the KD student's epochs alone."""
    kept: dict = {}
    teacher = run_stage("teach", register_as=None, attempt=attempt, keep=kept, parent_run_id=parent_run_id, **teach)
    tags = distill.get("tags", {}) | {TAG_TRIAL_TEACHER: teacher.run_id}
    return run_stage("distill", register_as=None, partner=None, partner_state=(kept["arch"], kept["state"]),
                     attempt=attempt, callbacks=callbacks, parent_run_id=parent_run_id, **(distill | {"tags": tags}))


class StageInterrupted(TTKDError):
    """A stage stopped by SIGINT or SIGTERM; its run is marked KILLED and can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclasses.dataclass
class Prepared:
    """A stage ready to train (:func:`prepare`'s answer): its inputs checked, its partner
    fetched and verified, its step chosen, everything on the training device."""

    setup: Setup               # what every process of a group builds alike, the chosen step in it
    data: datasets.ImageData
    model: torch.nn.Module
    partner_net: torch.nn.Module | None
    objective: torch.nn.Module
    device: torch.device
    choice: StepChoice         # the step and why (a resumed run's: the one it started with)
    register_as: str | None    # None: a trial, which registers nothing
    tags: dict[str, str]
    partner: ModelRef | None   # the partner pinned to one version
    partner_asked: str | None  # the partner's reference as given (an alias, a name...)
    found: modelstore.Partner | None
    record: dict               # what resuming needs to rebuild this stage exactly (TAG_STAGE_ARGS)

    @property
    def spec(self) -> Stage:
        return STAGES[self.setup.stage]


def prepare(stage: str, *, arch: str, train: TrainConfig, partner: str | None, method: str,
            method_params: dict, dataset: str, data_dir: str | None, stream: bool | None,
            register_as: str | None, tags: dict[str, str] | None = None, resume_from: tuple[str, dict] | None = None,
            step: Step | None = None, partner_data: str = "same", trust_unverified: bool = False,
            holdout: float = 0.0, param_names: dict[str, str] | None = None,
            partner_state: tuple[str, dict] | None = None) -> Prepared:
    """Everything a user can get wrong, checked before a run is opened; the partner fetched
    and verified (against the whole data set it was trained on), or ``partner_state`` (its
    architecture and weights, trained by this process: a teacher search's trial); with ``holdout``, the training
    split cut into what trains and the holdout it is evaluated on (``ImageData.holdout``); the
    networks and the objective built; the step (precision, compile) decided here once, or
    ``step`` as a resumed run started with."""
    spec = STAGES[stage]
    if holdout and register_as is not None:
        raise TTKDError("a stage evaluated on a holdout is a search's trial and registers nothing; "
                        "give register_as=None")
    if register_as is not None:
        registry.check_model_name(register_as)
    registry.prepare_store()
    device = stage_device(train.device)
    kd.get(method, spec.role)
    check_processes((method,), several=distributed.world() is not None)
    setup = Setup(stage, arch, train, method, method_params, dataset, data_dir, stream, holdout=holdout,
                  ckpt=resume_from[1] if resume_from else None)
    whole = datasets.load(dataset, data_dir, stream)
    data = whole.holdout(holdout) if holdout else whole
    partner_ref = found = None
    if partner is not None:
        partner_ref = registry.resolve(partner)  # pinned to one version for every process
        with tempfile.TemporaryDirectory() as tmp:
            found = modelstore.load_partner(partner_ref, whole, spec.partner, tmp, partner_data, trust_unverified)
        for warning in (found.unverified, found.unchecked):
            if warning:
                log.warning(warning)
        if found.foreign:
            log.info("partner_data=any: %s", found.foreign)
        setup = dataclasses.replace(setup, partner_arch=found.arch, partner_state=found.net.state_dict())
    elif partner_state is not None:
        setup = dataclasses.replace(setup, partner_arch=partner_state[0], partner_state=partner_state[1])
    data, model, partner_net, objective = build(setup, data)
    data = data.to(device)
    model.to(device)
    if partner_net is not None:
        partner_net.to(device)
    if resume_from is None:
        choice = choose_step(model, data, objective, train, partner_net)
    else:  # a resumed run keeps the step it started with
        step = step or Step.forced(train)
        how = f"as run {resume_from[0]} started"
        choice = StepChoice(step.bf16, how, {}, step.compile, how)
    log.info(step_line(choice, device))
    setup = dataclasses.replace(setup, step=choice.step)
    record = {"arch": arch, "dataset": dataset, "data_dir": data_dir, "stream": stream,
              "register_as": register_as, "train": dataclasses.asdict(train),
              "step": dataclasses.asdict(choice.step), "method": method, "method_params": method_params,
              "partner": partner_ref.uri if partner_ref else None, "partner_data": partner_data,
              "trust_unverified": trust_unverified, "tags": tags or {}, "holdout": holdout,
              "param_names": param_names or {}}
    return Prepared(setup, data, model, partner_net, objective, device, choice, register_as, tags or {},
                    partner_ref, partner, found, record)


def partner_tags(p: Prepared) -> dict[str, str]:
    """The tags a run and its registered version carry about the partner."""
    if p.partner is None:
        return {}
    return ({TAG_PARTNER: p.partner.uri} | ({TAG_PARTNER_DATA: "foreign"} if p.found.foreign else {})
            | ({modelstore.TAG_TRUSTED: p.partner.uri} if p.found.unverified else {}))


def record_start(p: Prepared) -> None:
    """A new run's tags, parameters, data set and step choice."""
    s, train = p.setup, p.setup.train
    tracking.set_tags({TAG_STAGE: s.stage, TAG_METHOD: s.method} | p.tags | partner_tags(p)
                      | {tracking.TAG_STAGE_ARGS: json.dumps(p.record, sort_keys=True)})
    tracking.log_params({
        "dataset": s.dataset, "data_dir": s.data_dir or "", "stream": STREAM_WORDS[s.stream],
        "streamed": p.data.streamed, "arch": s.arch, **({"register_as": p.register_as} if p.register_as else {}),
        **({"holdout": s.holdout} if s.holdout else {}), **dataclasses.asdict(train),
        **({"method": s.method} if s.stage == "distill" else {}),
        **{p.record["param_names"].get(k, k): v for k, v in s.method_params.items()},
        **({p.spec.partner: p.partner_asked, "partner_data": p.record["partner_data"],
            "trust_unverified": p.record["trust_unverified"]} if p.partner else {}),
        "num_params": models.num_parameters(p.model), "device_used": str(p.device),
        "world_size": distributed.size(),
    })
    tracking.log_dataset(p.data)
    c = p.choice
    tracking.set_tags({TAG_PRECISION: "bf16" if c.bf16 else "float32", "ttkd.precision_reason": c.reason,
                       TAG_COMPILE: c.compile or "eager", "ttkd.compile_reason": c.compile_reason[:5000]})
    tracking.log_metrics({f"calibration_{name.replace('+', '_compiled_')}_img_s": rate
                          for name, rate in c.rates.items()}
                         | ({"calibration_compile_s": c.compile_s} if c.compile_s is not None else {}))


def train_stage(p: Prepared, run_id: str, fence: attempts.Attempt, callbacks: Sequence[Callback] = ()
          ) -> tuple[dict, float, float | None]:
    """Train ``p`` in run ``run_id`` with the stage's callbacks and then ``callbacks``;
    returns the last epoch's stats (as a dict), the best val_acc and the partner's val_acc.
    A stop request ends it with :class:`StageInterrupted`, a lost peer with ``distributed.Lost``."""
    ckpt, s, split = p.setup.ckpt, p.setup, p.data.evaluated_on
    partner_acc = None
    if p.partner_net is not None and split == "val":  # (the partner trained on the holdout's images)
        partner_acc = accuracy(predict(p.partner_net, p.data, s.train.batch_size), p.data.val_y)
        log.info(f"{p.spec.partner} {p.partner.uri}: val_acc {partner_acc:.2f}%")
    if ckpt is not None and ckpt["epoch"] not in tracking.logged_steps(run_id, f"{split}_acc"):
        tracking.log_epoch(EpochStats(**ckpt["stats"]), partner_acc, split)  # killed between its checkpoint and metrics
    meta = {"format": tracking.CHECKPOINT_FORMAT, "stage": s.stage, "arch": s.arch,
            "num_classes": p.data.num_classes, "image_shape": list(p.data.image_shape)}
    with tempfile.TemporaryDirectory() as tmp, stop_on_signals() as stop:
        keep = callbacks_.Checkpoints(run_id, p.model, Path(tmp), meta, ckpt["best_val_acc"] if ckpt else -1.0,
                                      resumed=ckpt is not None)
        on_epoch = callbacks_.run_all([lambda stats, engine: fence.check(), callbacks_.recheck(p.choice), keep,
                                       callbacks_.metrics(partner_acc, split),
                                       callbacks_.console(s.train.epochs, split), callbacks_.test_hooks, *callbacks])
        try:
            history = fit(p.model, p.data, p.objective, s.train, partner=p.partner_net, step=s.step,
                          on_epoch=on_epoch, resume=ckpt["engine"] if ckpt else None, stop=stop,
                          progress=console.progress)
        except Interrupted as exc:
            distributed.done()
            where = "" if stop.signum else " (sent to another process of this stage)"
            raise StageInterrupted(
                f"stopped by {signal.Signals(exc.signum).name}{where} in epoch {exc.epoch}; run {run_id} is "
                f"marked KILLED and keeps its last finished epoch: continue it with resume={run_id}",
                exc.signum) from None
        except NonFiniteLoss:
            distributed.done()
            raise
        except RuntimeError as exc:
            if distributed.world() is None:
                raise
            raise distributed.Lost(
                f"another process of this stage stopped ({_first_line(exc)}); run {run_id} is marked FAILED "
                f"and keeps its last finished epoch: continue it with resume={run_id}") from None
        distributed.done()
    last = dataclasses.asdict(history[-1]) if history else dict(ckpt["stats"])
    tracking.log_metrics({f"best_{split}_acc": keep.best})
    return last, keep.best, partner_acc


def publish(p: Prepared, run_id: str, fence: attempts.Attempt) -> ModelRef:
    """Measure what the trained network costs to run, log it as the run's model and register
    it once (``attempts.register_once``), with its digests on the run and the version."""
    measured = {}  # what the served network costs, measured on it before it is logged

    def measure(path: Path) -> None:  # (and, trained on a GPU, the network there)
        start = time.perf_counter()
        on_cuda = (copy.deepcopy(p.model).eval().to(p.device), p.device) if p.device.type == "cuda" else None
        served = serving.load_network(str(path), p.data.image_shape, p.data.num_classes,
                                      threads=tracking.COST_THREADS)
        measured["cost"] = cost.measure(p.model, served, p.data.image_shape, path.stat().st_size,
                                        threads=tracking.COST_THREADS, on_cuda=on_cuda)
        measured["seconds"] = time.perf_counter() - start
    fence.check()
    s = p.setup
    info, digests = modelstore.log_model(p.model, p.data, s.arch, on_export=measure)
    tracking.log_metrics(measured["cost"].metrics() | {"cost_measure_s": measured["seconds"]})
    tracking.set_tags({modelstore.TAG_DIGESTS: json.dumps(digests, sort_keys=True)})
    version_tags = {TAG_STAGE: s.stage, TAG_METHOD: s.method, "ttkd.dataset": s.dataset, "ttkd.arch": s.arch,
                    modelstore.TAG_DIGESTS: json.dumps(digests, sort_keys=True),
                    **tracking.cost_tags(measured["cost"]), **p.tags, **partner_tags(p)}
    ref = attempts.register_once(fence, info.model_uri, p.register_as, version_tags)
    tracking.set_tags({"ttkd.registered_model": ref.uri})
    return ref


def run_stage(stage: str, *, arch: str, train: TrainConfig, partner: str | None, method: str,
              method_params: dict, dataset: str, data_dir: str | None, stream: bool | None,
              register_as: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
              resume_from: tuple[str, dict] | None = None, step: Step | None = None, partner_data: str = "same",
              trust_unverified: bool = False, attempt: attempts.Token | None = None,
              callbacks: Sequence[Callback] = (), holdout: float = 0.0, run_name: str | None = None,
              param_names: dict[str, str] | None = None, partner_state: tuple[str, dict] | None = None,
              keep: dict | None = None) -> StageResult:
    """Run ``stage`` (a name in ``STAGES``): train ``arch`` with ``method`` beside the
    frozen ``partner`` reference (trained on this stage's data set unless ``partner_data``
    is ``any``; its files verified against the registry's digests unless ``trust_unverified``),
    log everything to an MLflow run and register the result as ``register_as`` (None: a
    search's trial, which logs no model and registers nothing; with ``holdout``, the fraction of
    the training split it is evaluated on instead of the validation split; ``param_names``: the
    names its method's parameters are logged under, a search's for its trials: kd_temperature).
    ``tags`` go on the run and on the registered version; the run is a child of
    ``parent_run_id`` (or of the active run) if given. ``resume_from`` = (run id,
    checkpoint) continues that run in the ``step`` it started with. ``attempt`` is this
    try's token (``ttkd.tracking.attempts``; given by a sweep, else the run's next): a newer attempt
    at the run stops this one before its next write. ``callbacks`` run after each epoch's
    own (``ttkd.callbacks``). ``partner_state`` and ``keep`` pass a partner in memory, within one
    process (:func:`teacher_trial`): the partner's architecture and weights, and a dict that gets
    the trained network's (``arch``, ``state``). In a process group this is the leader's part; the
    followers train alongside in :func:`follow_stage`.

    Three steps: :func:`prepare` (before any run is opened), :func:`train_stage`, :func:`publish`."""
    p = prepare(stage, arch=arch, train=train, partner=partner, method=method, method_params=method_params,
                dataset=dataset, data_dir=data_dir, stream=stream, register_as=register_as, tags=tags,
                resume_from=resume_from, step=step, partner_data=partner_data, trust_unverified=trust_unverified,
                holdout=holdout, param_names=param_names, partner_state=partner_state)
    if distributed.world() is not None:
        distributed.lead(p.setup)
    run = tracking.start_run(resume_from[0] if resume_from else None, name=run_name or f"{stage} {arch}",
                             parent_run_id=parent_run_id)
    run_id, status, fence = run.info.run_id, "FAILED", None
    try:
        fence = attempts.begin(run_id, parent_id=parent_run_id or run.data.tags.get(tracking.PARENT_TAG),
                               point=p.tags.get(attempts.POINT_TAG), token=attempt, fresh=resume_from is None)
        if resume_from is None:
            record_start(p)
        else:
            ckpt = resume_from[1]
            tracking.set_tags(p.tags | {"ttkd.resumed_after_epoch": str(ckpt["epoch"])})
            before = ckpt["engine"].get("world_size", 1)
            log.info(f"resuming run {run_id} after epoch {ckpt['epoch']}"
                     + (f", with {_processes(distributed.size())} instead of {before}"
                        if before != distributed.size() else ""))
        last, _, partner_acc = train_stage(p, run_id, fence, callbacks)
        if keep is not None:
            keep |= {"arch": arch, "state": {k: v.detach().to("cpu", copy=True)
                                             for k, v in p.model.state_dict().items()}}
        split, ref = p.data.evaluated_on, None
        if p.register_as is not None:
            ref = publish(p, run_id, fence)
            log.info(f"registered {ref.uri} (val_acc {last['val_acc']:.2f}%, run {run_id})")
        else:
            log.info(f"run {run_id}: {split}_acc {last['val_acc']:.2f}% (a trial: nothing registered)")
        status = "FINISHED"
    except StageInterrupted:
        status = "KILLED"
        raise
    except callbacks_.StopTraining as exc:  # ended early as planned: a pruned trial
        tracking.set_tags(exc.tags)
        status = "FINISHED"
        raise
    finally:
        if fence is not None and fence.current():
            tracking.end_run(status)
        else:  # a newer attempt owns the run (or this one could not claim it): its state is not ours
            tracking.leave_run()
    return StageResult(run_id, ref, last["val_acc"], last["agreement"], p.partner, partner_acc, split)


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
