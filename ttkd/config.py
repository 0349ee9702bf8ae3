"""Run parameters: one table, presets, and how the two combine.

Every parameter a stage takes is listed once in ``PARAMS`` with its type, default,
check and meaning. A value comes from, in order of precedence: the command line, the
preset (``experiments/NAME.toml``), the stage's own default, the table's default.
Values from every source go through the same checks, so a bad number in a preset
is refused as clearly as one typed on the command line; unknown keys are refused.

The table sits below everything that reads it and imports none of it: the registries (data
sets, architectures, methods) tell it what they accept when they load (``provide``), and each
KD method declares its own parameters where it registers (``ttkd.kd.register`` calls
``declare_method``); ``PARAMS``, ``METHOD_PARAMS`` and ``STAGE_PARAMS`` include them.

A study preset (``stage = "main"``) may set training parameters per role in
``[student]`` and ``[teacher]`` tables; top-level values apply to both roles, and a
value given on the command line overrides both. A sweep (``stage = "sweep"``) takes the
study's parameters with ``seeds``, ``weights`` and ``methods`` in place of ``seed``,
``weight`` and ``method``; it also runs a study preset, whose ``weight`` and ``method``
become the sweep's defaults ``weights = 0,WEIGHT`` and ``methods = METHOD``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ttkd.errors import TTKDError

STAGES = ("baseline", "teach", "distill", "main", "sweep")
MAX_MODELS = 100  # a sweep that would register more model versions needs force=true
MAX_SEED = 2**32 - 1  # what numpy's generator takes
MAX_WEIGHT = 100.0  # |w|: the papers use 0.005 to 0.1; beyond this, w·T²·KL overflows float32 long before


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a network trains: the training parameters of the table below, as a stage takes
    them. ``amp`` and ``compile`` are requests (``auto`` is decided by ``ttkd.choice``)."""

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
    amp: bool | str = "auto"    # bf16 autocast and channels_last: True, False (float32), or "auto":
                                # bf16 where a short calibration measures it faster (choose_step)
    compile: bool | str = "auto"  # torch.compile the training step: True, False, a compile mode, or "auto":
                                  # compiled where a calibration finds it repays its compile time (choose_step)
    deterministic: bool = False  # deterministic kernels: a resumed run repeats an uninterrupted one


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: str                   # "int", "float", "bool", "auto-bool" (auto, true or false), "str",
                                # or a comma-separated list:
                                # "ints", "floats", "strs", "seeds" (a count or a list)
    default: Any
    help: str
    allowed: str = ""           # what a valid value is, for the error message; {dataset}, {arch} and
                                # {method} stand for what those registries accept (see provide)
    valid: Callable[[Any], bool] = lambda v: True

    def what(self) -> str:
        """What a valid value is, with the registries' names filled in."""
        if "{" not in self.allowed:
            return self.allowed
        return self.allowed.format(**{kind: provided(kind).text for kind in REGISTRIES
                                      if f"{{{kind}}}" in self.allowed})


@dataclasses.dataclass(frozen=True)
class Provided:
    """What a registry (data sets, architectures, methods) tells the table: its names, which
    values it accepts, and how the reference says so."""

    names: Callable[[], list[str]]
    valid: Callable[[str], bool] | None = None  # default: one of names()
    describe: Callable[[], str] | None = None   # default: the names, comma-separated

    @property
    def text(self) -> str:
        return self.describe() if self.describe else ", ".join(self.names())

    def accepts(self, value: str) -> bool:
        return self.valid(value) if self.valid else value in self.names()


# the registries whose names are parameter values, and the module that fills each when imported;
# the table reads them when a value is checked, never when it is imported
REGISTRIES = {"dataset": "ttkd.data", "arch": "ttkd.models", "method": "ttkd.kd"}
_PROVIDED: dict[str, Provided] = {}


def provide(kind: str, what: Provided) -> None:
    """A registry's answer for ``kind`` (one of ``REGISTRIES``); called by the registry itself."""
    _PROVIDED[kind] = what


def provided(kind: str) -> Provided:
    """What registry ``kind`` accepts; the registry's module is loaded first if nothing has yet."""
    if kind not in _PROVIDED:
        importlib.import_module(REGISTRIES[kind])
    return _PROVIDED[kind]


def _choice(options: Callable[[], list[str]]):
    return lambda v: v in options()


def _registered(kind: str):
    return lambda v: provided(kind).accepts(v)


def _cluster_address(v: str) -> bool:
    address = v[len("ray://"):] if v.startswith("ray://") else v
    host, _, port = address.rpartition(":")
    return v in ("", "local", "auto") or (bool(host) and port.isdigit())


_TABLE: dict[str, Param] = {p.name: p for p in [
    Param("dataset", "str", "digits", "data set", "{dataset}", _registered("dataset")),
    Param("data_dir", "str", "", "folder with the data set's files (default ./data)"),
    Param("stream", "str", "auto", "image folders (imagefolder, tiny-imagenet): true leaves the images on "
          "disk, decoded batch by batch by DataLoader workers; false decodes them into memory; auto "
          "leaves them on disk when they would fill more than a quarter of the RAM", "auto, true or false",
          _choice(lambda: ["auto", "true", "false"])),
    Param("arch", "str", "mlp", "network to train", "a registered architecture: {arch}", _registered("arch")),
    Param("student_arch", "str", "mlp", "the study's student network", "a registered architecture",
          _registered("arch")),
    Param("teacher_arch", "str", "cnn", "the study's teacher network", "a registered architecture",
          _registered("arch")),
    Param("epochs", "int", TrainConfig.epochs, "passes over the training split", "an integer >= 1",
          lambda v: v >= 1),
    Param("batch_size", "int", TrainConfig.batch_size, "images per optimiser step", "an integer >= 1",
          lambda v: v >= 1),
    Param("optimizer", "str", TrainConfig.optimizer, "sgd (with momentum) or adam", "sgd or adam",
          _choice(lambda: ["sgd", "adam"])),
    Param("lr", "float", TrainConfig.lr, "initial learning rate", "a number > 0", lambda v: v > 0),
    Param("momentum", "float", TrainConfig.momentum, "SGD momentum", "a number in [0, 1)",
          lambda v: 0 <= v < 1),
    Param("weight_decay", "float", TrainConfig.weight_decay, "L2 penalty on every parameter",
          "a number >= 0", lambda v: v >= 0),
    Param("schedule", "str", TrainConfig.schedule,
          "learning-rate schedule: cosine (to 0 at the last epoch), step (x gamma at milestones), constant",
          "cosine, step or constant", _choice(lambda: ["cosine", "step", "constant"])),
    Param("milestones", "ints", TrainConfig.milestones, "epochs after which step multiplies lr by gamma",
          "comma-separated increasing epochs >= 1, like 80,120",
          lambda v: all(m >= 1 for m in v) and list(v) == sorted(set(v))),
    Param("gamma", "float", TrainConfig.gamma, "learning-rate factor at each milestone",
          "a number > 0", lambda v: v > 0),
    Param("seed", "int", TrainConfig.seed, "fixes weight init, data order and augmentation",
          f"an integer from 0 to {MAX_SEED}", lambda v: 0 <= v <= MAX_SEED),
    Param("device", "str", TrainConfig.device, "auto (CUDA if visible), cpu, cuda or cuda:N"),
    Param("amp", "auto-bool", TrainConfig.amp, "bf16 mixed precision and channels_last: true forces it "
          "(emulated, slower, on a CPU without native bf16), false trains in float32, auto takes bf16 where "
          "a few timed steps before the first epoch find it faster for this network, batch and device",
          "auto, true or false"),
    Param("compile", "auto-bool", TrainConfig.compile, "torch.compile the whole training step (the network "
          "with its method's loss, and the frozen partner's forward): true forces it, false trains eagerly, auto "
          "compiles when a calibration before the first epoch finds that the stage repays the compile time",
          "auto, true or false"),
    Param("deterministic", "bool", TrainConfig.deterministic,
          "deterministic kernels, so that a resumed run repeats an uninterrupted one", "true or false"),
    Param("seeds", "seeds", (0, 1, 2, 3, 4), "the sweep's seeds: a count N (seeds 0 to N-1), or a "
          "comma-separated list such as 3,7 (one seed other than 0: 7,)",
          f"a count from 1 to 10000 or a list of distinct integers from 0 to {MAX_SEED}, like 5 or 0,3,7",
          lambda v: len(v) >= 1 and min(v) >= 0 and max(v) <= MAX_SEED and len(set(v)) == len(v)),
    Param("weights", "floats", (0.0, 0.005), "the sweep's teacher weights w (0, the normal teacher, "
          "is always included)", f"a comma-separated list of distinct numbers from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, "
          "like -0.02,0,0.005,0.02",
          lambda v: len(v) >= 1 and len({f"{w:g}" for w in v}) == len(v) and max(map(abs, v)) <= MAX_WEIGHT),
    Param("methods", "strs", ("kd",), "the sweep's distillation methods",
          "a comma-separated list of distinct methods among {method}",
          lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(map(_registered("method"), v))),
    Param("jobs", "int", 2, "points of the sweep trained at once, each in its own worker process "
          "(2 jobs of 1 thread beat 1 job of 2 threads by 1.47x on a 2-core CPU)",
          "an integer >= 1", lambda v: v >= 1),
    Param("threads", "int", 0, "CPU threads per point (0: this process's torch threads / jobs; with "
          "cluster=, cpus_per_point); the thread "
          "count changes a CPU run's last bits, jobs does not", "an integer >= 0", lambda v: v >= 0),
    Param("cluster", "str", "", "train the sweep's points on a Ray cluster instead of this machine's "
          "worker processes: auto (the cluster this machine belongs to), HOST:PORT (what `ray start --head` "
          "printed), ray://HOST:10001 (Ray client), or local (a Ray instance on this machine alone); needs "
          "pip install -e '.[cluster]' and, except for local, a tracking server (MLFLOW_TRACKING_URI=http://...)",
          "local, auto, HOST:PORT or ray://HOST:PORT", _cluster_address),
    Param("cluster_auth", "str", "token", "token: refuse a cluster address that accepts jobs without Ray's token "
          "authentication (cluster=local always runs with a fresh token); none: hand points to such a cluster "
          "anyway, for a network only you can reach", "token or none", _choice(lambda: ["token", "none"])),
    Param("cpus_per_point", "float", 1.0, "CPUs each point's Ray task declares (with cluster=)",
          "a number > 0", lambda v: v > 0),
    Param("gpus_per_point", "float", 0.0, "GPUs each point's Ray task declares (with cluster=); a fraction "
          "packs several points on one GPU (0.25: four)", "0, a fraction up to 1, or a whole number",
          lambda v: v == 0 or 0 < v <= 1 or float(v).is_integer() and v > 0),
    Param("force", "bool", False, f"let a sweep register more than {MAX_MODELS} model versions",
          "true or false"),
    Param("nproc", "int", 1, "training processes on this machine: one per GPU, or CPU processes "
          "(gloo); more than 1 starts them with torchrun and trains with DistributedDataParallel",
          "an integer >= 1", lambda v: v >= 1),
    Param("nnodes", "int", 1, "machines training together, each started with the same command and "
          "its own node_rank", "an integer >= 1", lambda v: v >= 1),
    Param("node_rank", "int", 0, "this machine's number, 0 to nnodes-1; node_rank 0 talks to MLflow "
          "and the others take every other parameter from it", "an integer >= 0", lambda v: v >= 0),
    Param("rdzv_endpoint", "str", "", "HOST:PORT where the machines meet (c10d rendezvous), an "
          "address of the node_rank 0 machine; needed when nnodes > 1", "HOST:PORT",
          lambda v: v == "" or (":" in v and v.rsplit(":", 1)[1].isdigit())),
    Param("rdzv_timeout", "int", 300, "seconds the processes wait for each other to meet (and for "
          "rdzv_endpoint to answer)", "an integer >= 1", lambda v: v >= 1),
    Param("experiment", "str", "", "MLflow experiment the runs go in, created when missing (default: "
          "MLFLOW_EXPERIMENT_NAME, else the one `mlflow run` opened its run in, else Default); "
          "resume=last looks in it", "a name of at most 256 characters (what MLflow's tables hold)",
          lambda v: len(v) <= 256),
    Param("resume", "str", "", "continue an unfinished run of this stage from its last checkpoint: "
          "its run id, or last for the newest"),
    Param("student", "str", "", "the frozen student: a model reference", "a model reference",
          lambda v: v != ""),
    Param("teacher", "str", "", "the frozen teacher: a model reference", "a model reference",
          lambda v: v != ""),
    Param("partner_data", "str", "same", "same: the frozen partner must have been trained on this stage's data "
          "set (its name, class names in order and training images); any: allow another data set with the "
          "same image shape and class count, tagging the run ttkd.partner_data=foreign", "same or any",
          _choice(lambda: ["same", "any"])),
    Param("trust_unverified", "bool", False, "use a model whose files the registry holds no SHA-256 record of "
          "(registered by an older ttkd or outside ttkd) as it is, tagging the run ttkd.trust_unverified; without "
          "it such a model is refused", "true or false"),
    Param("weight", "float", 0.005, "w of CE + w·T²·KL(teacher ‖ student): > 0 trained, 0 normal, < 0 nasty",
          f"a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}", lambda v: abs(v) <= MAX_WEIGHT),
    Param("alpha", "float", 0.9, "weight of the KL term: (1 − α)·CE + α·T²·KL", "a number in [0, 1]",
          lambda v: 0 <= v <= 1),
    Param("temperature", "float", 4.0, "T of the teach stage (and of distill when run alone)",
          "a number > 0", lambda v: v > 0),
    Param("kd_temperature", "float", 4.0, "T of the study's distill stages", "a number > 0",
          lambda v: v > 0),
    Param("register_as", "str", "", "registered model name (main: prefix of the five names)"),
    Param("method", "str", "kd", "distillation method", "one of {method}", _registered("method")),
]}

_DECLARED: dict[str, Param] = {}        # the methods' own parameters, in the order they were declared
_USES: dict[str, tuple[str, ...]] = {}  # each method's parameters: its own and the table's it reads


def declare_method(method: str, params: tuple[str | Param, ...]) -> tuple[str, ...]:
    """The parameters of ``method``, as it registers (``ttkd.kd.register``): its own as
    ``Param`` rows, which join the table after its rows, and the table's by name (alpha,
    temperature, weight); returns their names."""
    names = []
    for p in params:
        if isinstance(p, Param):
            if p.name in _TABLE or _DECLARED.get(p.name, p) != p:
                raise TTKDError(f"method {method} declares parameter {p.name!r}, which another row already has")
            _DECLARED[p.name] = p
        elif p not in _TABLE and p not in _DECLARED:
            raise TTKDError(f"method {method} reads parameter {p!r}, which neither the table nor a method declares")
        names.append(p if isinstance(p, str) else p.name)
    _USES[method] = tuple(names)
    return tuple(names)


def params() -> dict[str, Param]:
    """Every parameter: the table's rows, then the methods' own (``ttkd.kd`` declares them)."""
    provided("method")
    return _TABLE | _DECLARED


def method_uses(method: str) -> tuple[str, ...]:
    """The parameters ``method`` reads, as it declared them."""
    provided("method")
    return _USES[method]


TRAIN = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
         "milestones", "gamma", "seed", "device", "amp", "compile", "deterministic")
LAUNCH = ("nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_timeout")  # where, not what: not in presets
CLUSTER = ("cluster", "cluster_auth", "cpus_per_point", "gpus_per_point")
FREE_ON_RESUME = ("resume", "experiment", "jobs", "threads") + CLUSTER + LAUNCH  # how it goes on, not what it computes
COMMON = ("dataset", "data_dir", "stream") + TRAIN + ("register_as", "experiment") + LAUNCH


def method_param_names() -> tuple[str, ...]:
    """The parameters that only some distillation methods take: those the methods declare."""
    provided("method")
    return tuple(_DECLARED)


def stage_params() -> dict[str, tuple[str, ...]]:
    """The parameters each entry point takes."""
    own = method_param_names()
    study = ("student_arch", "teacher_arch", "temperature", "alpha", "kd_temperature") + own
    return {
        "baseline": COMMON + ("arch", "resume"),
        "teach": COMMON + ("arch", "student", "partner_data", "trust_unverified", "weight", "temperature", "resume"),
        "distill": COMMON + ("arch", "teacher", "partner_data", "trust_unverified", "method", "alpha",
                             "temperature") + own + ("resume",),
        "main": COMMON + study + ("weight", "method", "resume"),
        "sweep": tuple(n for n in COMMON if n != "seed") + study + ("seeds", "weights", "methods", "jobs",
                                                                     "threads") + CLUSTER + ("force", "resume"),
    }


def __getattr__(name: str) -> Any:
    """``PARAMS``, ``METHOD_PARAMS`` and ``STAGE_PARAMS``, complete once the methods have declared theirs."""
    tables = {"PARAMS": params, "METHOD_PARAMS": method_param_names, "STAGE_PARAMS": stage_params}
    if name in tables:
        return tables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SWEEP_FROM_STUDY = {"weight": "weights", "method": "methods"}  # a study preset's values in a sweep
STAGE_DEFAULTS = {"teach": {"arch": "cnn"}}  # where a stage differs from the table
ROLES = ("student", "teacher")  # the per-role tables of a study preset


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A stage's parameters, checked: ``values`` maps every parameter of ``stage`` to its
    value; ``train`` is the training configuration (one per role for ``main`` and ``sweep``)."""

    stage: str
    values: dict[str, Any]
    train: dict[str, TrainConfig]  # "" for single stages, "student"/"teacher" for main and sweep
    preset: str | None = None
    given: tuple[str, ...] = ()    # set on the command line or by the preset (with resume only)

    def stage_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ttkd.stages.<stage>``."""
        kw = {k: v for k, v in self.values.items() if k not in TRAIN + LAUNCH + ("resume", "experiment")}
        kw["data_dir"] = kw["data_dir"] or None
        kw["stream"] = {"auto": None, "true": True, "false": False}[kw["stream"]]
        kw["register_as"] = kw["register_as"] or None
        if "method" in kw or "methods" in kw:  # a method's own parameters travel as one dict
            distill_t = ("temperature",) if self.stage == "distill" else ()
            for name in ("alpha", "kd_temperature", *method_param_names(), *distill_t):
                kw.pop(name, None)
            params = {m: {n: self.values[k] for n, k in zip(method_uses(m), method_params(self.stage, m))}
                      for m in kw.get("methods", (kw.get("method"),))}
            kw["method_params"] = params[kw["method"]] if "method" in kw else params
        if self.stage == "sweep":
            kw.pop("force")
            kw["weights"] = tuple(sorted(set(kw["weights"]) | {0.0}))
        if self.stage in ("main", "sweep"):
            return kw | {"student_train": self.train["student"], "teacher_train": self.train["teacher"]}
        return kw | {"train": self.train[""]}


def parse(param: Param, raw: Any) -> Any:
    """Turn ``raw`` (a command-line string or a TOML value) into the parameter's type and check it."""
    try:
        if param.kind == "int":
            number = float(raw) if isinstance(raw, str) else raw
            if isinstance(number, bool) or not float(number).is_integer():
                raise ValueError
            value = int(number)
        elif param.kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        elif param.kind in ("bool", "auto-bool"):
            words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            if param.kind == "auto-bool":
                words["auto"] = "auto"
            value = raw if isinstance(raw, bool) else words[str(raw).strip().lower()]
        elif param.kind == "seeds" and (isinstance(raw, int) or (isinstance(raw, str) and "," not in raw)):
            count = parse(Param(param.name, "int", 0, ""), raw)
            value = tuple(range(count)) if 1 <= count <= 10_000 else ()
        elif param.kind in ("ints", "floats", "strs", "seeds"):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            item = Param(param.name, {"floats": "float", "strs": "str"}.get(param.kind, "int"), 0, "")
            value = tuple(parse(item, i.strip() if isinstance(i, str) else i)
                          for i in items if str(i).strip())
            if param.kind == "floats" and not all(math.isfinite(v) for v in value):
                raise ValueError
        else:
            if not isinstance(raw, str):
                raise ValueError
            value = raw.strip()
    except (TypeError, ValueError, KeyError, TTKDError):
        raise TTKDError(f"invalid {param.name}: {raw!r}; {param.name} must be {param.what() or param.kind}") from None
    if param.kind == "float" and not math.isfinite(value):  # inf and nan pass every comparison check
        raise TTKDError(f"invalid {param.name}: {raw!r}; {param.name} must be {param.what() or 'a number'}, "
                        f"and finite")
    if not param.valid(value):
        raise TTKDError(f"invalid {param.name}: {raw!r}; {param.name} must be {param.what()}")
    return value


def preset_dirs() -> list[Path]:
    """Where presets are looked up: ./experiments, then the one beside the ttkd package."""
    return [Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments"]


def preset_names() -> list[str]:
    return sorted({p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.toml")})


def _preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix != ".toml":
        path = next((d / f"{name}.toml" for d in preset_dirs() if (d / f"{name}.toml").is_file()), None)
        if path is None:
            raise TTKDError(f"unknown preset {name!r}; presets: {', '.join(preset_names()) or '(none)'}")
    return path


def _read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A preset's settings with those of the preset it ``extends`` (a name or a path)
    underneath: its own values win, and role tables merge key by key."""
    if path in seen:
        raise TTKDError(f"preset {path} extends itself through {' -> '.join(p.stem for p in seen)}")
    try:
        settings = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TTKDError(f"cannot read preset {path}: {exc}") from None
    base = settings.pop("extends", None)
    if base is None:
        return settings
    merged = _read_preset(_preset_path(base), seen + (path,))
    for key, value in settings.items():
        merged[key] = merged.get(key, {}) | value if isinstance(value, dict) else value
    return merged


def load_preset(name: str) -> tuple[str, dict]:
    """Read preset ``name`` (a name from ``experiments/`` or a path to a .toml file);
    returns ``(stage, settings)``."""
    path = _preset_path(name)
    settings = _read_preset(path)
    stage = settings.pop("stage", None)
    if stage not in STAGES:
        raise TTKDError(f"preset {path} must set stage to one of {', '.join(STAGES)} (found {stage!r})")
    study = stage in ("main", "sweep")
    launch = sorted(set(settings) & set(LAUNCH))
    if launch:
        raise TTKDError(f"preset {path} sets {', '.join(launch)}: where a run trains is given on the "
                        f"command line, not in a preset")
    allowed = set(stage_params()[stage]) | (set(ROLES) if study else set())
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise TTKDError(f"preset {path} sets {', '.join(unknown)}, which stage {stage} does not take; "
                        f"it takes: {', '.join(sorted(allowed))}")
    for role in ROLES:
        if role in settings and study:
            extra = sorted(set(settings[role]) - set(TRAIN) - {"arch"} | ({"seed"} & set(settings[role])))
            if extra:
                raise TTKDError(f"preset {path} [{role}] sets {', '.join(extra)}; a role table takes "
                                f"arch and the training parameters other than seed (one seed "
                                f"serves both roles)")
    return stage, settings


def preset_stage(preset: str | None) -> str | None:
    """The stage a preset is for (None without a preset)."""
    return load_preset(preset)[0] if preset else None


def resolve(stage: str, given: dict[str, Any], preset: str | None = None) -> RunConfig:
    """Combine command-line values ``given`` (None or "" = not given), the preset and the
    defaults into a checked :class:`RunConfig` for ``stage``."""
    settings: dict = {}
    if preset:
        preset_for, settings = load_preset(preset)
        if stage == "sweep" and preset_for == "main":  # a study preset: its weight and method
            if "seed" in settings:                    # become the sweep's defaults
                raise TTKDError(f"preset {preset!r} sets seed; a sweep takes seeds instead "
                                f"(-P seeds=N or a list)")
            for one, many in SWEEP_FROM_STUDY.items():
                if one in settings:
                    value = settings.pop(one)
                    settings[many] = [0.0, value] if one == "weight" else [value]
        elif preset_for != stage:
            raise TTKDError(f"preset {preset!r} is for the {preset_for} stage; run it with "
                            f"-e {preset_for}" + ("" if preset_for == "sweep" else " (or with the main entry point)"))
    if given.get("experiment") is not None and not str(given["experiment"]).strip():  # '' given: a mistake
        raise TTKDError("invalid experiment: ''; give an experiment name, or leave experiment out for the "
                        "default (MLFLOW_EXPERIMENT_NAME, else the one `mlflow run` opened, else Default)")
    # an empty value is "not given", except for a sweep's lists, where it is an empty list
    cli = {k: v for k, v in given.items() if k in stage_params()[stage] and v is not None
           and (v != "" or params()[k].kind in ("floats", "strs", "seeds"))}
    def value(name: str, role: str | None = None) -> Any:
        param = params()[name]
        if name in cli:
            return parse(param, cli[name])
        if role and name in settings.get(role, {}):
            return parse(param, settings[role][name])
        if name in settings:
            return parse(param, settings[name])
        return STAGE_DEFAULTS.get(stage, {}).get(name, param.default)

    values = {name: value(name) for name in stage_params()[stage]}
    if "method" in values or "methods" in values:
        _check_method_params(stage, values.get("methods", (values.get("method"),)), set(cli) | set(settings))
    several = values["nproc"] * values["nnodes"] > 1 or under_torchrun()
    if stage == "sweep":
        _check_cluster(values, set(cli) | set(settings), several)
    if stage == "sweep" and several:
        if values["jobs"] > 1 and ("jobs" in cli or "jobs" in settings):
            raise TTKDError(f"jobs={values['jobs']} with nproc={values['nproc']}: a sweep trained by "
                            f"several processes runs its points one at a time; drop jobs")
        values["jobs"] = 1
    check_processes(values.get("methods", (values.get("method"),)), several)
    if stage == "sweep":
        count = sweep_size(values["seeds"], set(values["weights"]) | {0.0}, values["methods"])
        if count > MAX_MODELS and not values["force"]:
            raise TTKDError(f"this sweep would register {count} model versions (more than {MAX_MODELS}); "
                            f"pass force=true to run it, or use fewer seeds, weights or methods")
    if stage in ("main", "sweep"):  # (a sweep sets each point's seed itself)
        train = {role: _train_config({n: value(n, role) for n in TRAIN}) for role in ROLES}
        for role in ROLES:  # a role table may name the architecture as `arch`
            key = f"{role}_arch"
            if key not in cli and "arch" in settings.get(role, {}):
                values[key] = parse(params()[key], settings[role]["arch"])
    else:
        train = {"": _train_config({n: values[n] for n in TRAIN})}
    given = ()
    if values.get("resume"):  # compared with the run's own values once the run is known
        named = set(cli) | {k for key, v in settings.items()
                            for k in (v if key in ROLES and isinstance(v, dict) else (key,))}
        given = tuple(sorted(named - set(FREE_ON_RESUME)))
    return RunConfig(stage, values, train, preset, given)


def resume_conflicts(cfg: RunConfig, logged: dict[str, str]) -> list[str]:
    """The parameters given with ``resume`` (``cfg.given``) whose value differs from the
    one the run logged, each as ``NAME=GIVEN (the run has LOGGED)``; equal values pass.
    A study's or sweep's training parameters are compared with both roles' (``student.lr``,
    ``teacher.lr``), a sweep's method parameters with each method's (``dkd.dkd_beta``)."""
    conflicts = []
    for name in cfg.given:
        param = params()[name]
        if cfg.stage in ("main", "sweep") and name in TRAIN:
            pairs = [(f"{role}.{name}", getattr(cfg.train[role], name)) for role in ROLES]
        else:
            pairs = [(name, cfg.values[name])] + [(f"{m}.{name}", cfg.values[name])
                                                   for m in cfg.values.get("methods", ())]
        pairs = [(key, value) for key, value in pairs if key in logged]
        if not pairs:
            conflicts.append(f"{name} (the run did not record it)")
        for key, value in pairs:
            theirs = _logged_value(param, logged[key])
            if _canonical(name, theirs) != _canonical(name, value):
                conflicts.append(f"{name}={_show(value)} (the run has {key}={logged[key]})")
    return list(dict.fromkeys(conflicts))


def check_resume(cfg: RunConfig, run_id: str, logged: dict[str, str]) -> None:
    """Refuse resuming run ``run_id`` with a given value that differs from its own."""
    conflicts = resume_conflicts(cfg, logged)
    if conflicts:
        raise TTKDError(f"resume continues run {run_id} with the values it started with, and these "
                        f"differ: {'; '.join(conflicts)}; drop them, or start a new run without resume")


def _logged_value(param: Param, text: str) -> Any:
    """A logged parameter (MLflow keeps str(value): ``(30, 60)``, ``True``, ``None``) parsed
    as the command line's would be; None when it does not parse."""
    text = "" if text == "None" else text.strip("()[]") if param.kind in ("ints", "floats", "strs", "seeds") else text
    try:
        return parse(dataclasses.replace(param, valid=lambda v: True), text)
    except TTKDError:
        return None


def _canonical(name: str, value: Any) -> Any:
    return tuple(sorted(set(value) | {0.0})) if name == "weights" else value  # a sweep always has w = 0


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def method_params(stage: str, method: str) -> tuple[str, ...]:
    """The parameters of ``stage`` that ``method`` reads (in main, kd_temperature is the
    distill stages' temperature)."""
    names = method_uses(method)
    return tuple("kd_temperature" if stage in ("main", "sweep") and n == "temperature" else n for n in names)


def sweep_size(seeds, weights, methods) -> int:
    """How many model versions a sweep registers: per seed a student, a teacher per weight
    and a KD student per weight and method."""
    return len(seeds) * (1 + len(weights) * (1 + len(methods)))


def _check_cluster(values: dict, given: set[str], several: bool) -> None:
    """cluster= replaces this machine's pool (jobs) and cannot be one run on many processes (nproc)."""
    if not values["cluster"]:
        stray = sorted(given & {"cluster_auth", "cpus_per_point", "gpus_per_point"})
        if stray:
            raise TTKDError(f"{', '.join(stray)} place{'s' if len(stray) == 1 else ''} points on a Ray cluster, "
                            f"and no cluster is given; add cluster=local|auto|HOST:PORT, or drop "
                            f"{'it' if len(stray) == 1 else 'them'}")
        return
    if "jobs" in given:
        raise TTKDError(f"cluster={values['cluster']} with jobs={values['jobs']}: on a cluster Ray decides how "
                        f"many points train at once (from cpus_per_point and gpus_per_point); drop jobs")
    if several:
        raise TTKDError(f"cluster={values['cluster']} with nproc={values['nproc']}: each point of a cluster "
                        f"sweep is one process; drop nproc (or run the sweep without cluster=)")
    check_ray()


def under_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (or ttkd's launcher)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def check_ray() -> None:
    """Ray, the optional extra that ``cluster=`` needs, is installed."""
    if importlib.util.find_spec("ray") is None:
        raise TTKDError("cluster= needs Ray, an optional extra: pip install -e '.[cluster]'")


def check_processes(methods, several: bool) -> None:
    """Refuse a method that cannot train as ``several`` processes of one stage."""
    if several and "crd" in methods:
        raise TTKDError("crd keeps a memory bank per process, which several processes would split; "
                        "run crd with nproc=1")


def _check_method_params(stage: str, methods: tuple[str, ...], given: set[str]) -> None:
    """Refuse a method parameter that the chosen method(s) would silently ignore."""
    own = {"alpha", "kd_temperature"} | set(method_param_names()) | ({"temperature"} if stage == "distill" else set())
    used = {n for m in methods for n in method_params(stage, m)}
    stray = sorted((given & own) - used)
    if stray:
        which = f"method {methods[0]} does not" if len(methods) == 1 else f"none of the methods {', '.join(methods)}"
        takes = ", ".join(sorted(used)) or "no parameters of their own"
        raise TTKDError(f"{which} use{'s' if len(methods) > 1 else ''} {', '.join(stray)}; "
                        f"{'it takes' if len(methods) == 1 else 'they take'} {takes} "
                        f"(drop the others, or choose the method they belong to)")


def _train_config(values: dict) -> TrainConfig:
    if values["schedule"] == "step" and not values["milestones"]:
        raise TTKDError("schedule step needs milestones, such as milestones=80,120")
    return TrainConfig(**values)
