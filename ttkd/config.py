"""Run parameters: one table and its parser.

Every parameter a stage takes is listed once in ``PARAMS`` with its type, default,
check and meaning; :func:`parse` turns a command-line string or a TOML value into it and
checks it. How the sources combine (command line, preset, defaults) is ``ttkd.presets``.

The table sits below everything that reads it and imports none of it: the registries (data
sets, architectures, methods) tell it what they accept when they load (``provide``), and each
KD method declares its own parameters where it registers (``ttkd.kd.register`` calls
``declare_method``); ``PARAMS``, ``METHOD_PARAMS`` and ``STAGE_PARAMS`` include them.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

from ttkd.errors import TTKDError

STAGES = ("baseline", "teach", "distill", "main", "sweep", "search")
SAMPLERS = ("tpe", "random", "cmaes", "grid")  # Optuna's samplers a search takes
PRUNERS = ("median", "halving", "none")        # and its pruners
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

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A TrainConfig from its dict form (as checkpoints and study.json keep it)."""
        return cls(**(values | {"milestones": tuple(values["milestones"])}))


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
    Param("axes", "axes", (), "more axes of the sweep, crossed with seeds x weights x methods: "
          "NAME=V1,V2;NAME=V3,V4 over any parameter of the study (student_arch, teacher_arch, the training "
          "parameters, or one role's as student.lr and teacher.lr, temperature, alpha, kd_temperature, a "
          "method's own); each value feeds the stage that reads it and every stage after it",
          "NAME=V1,V2;… with each NAME a parameter of the study and each value valid for it"),
    Param("methods", "strs", ("kd",), "the sweep's distillation methods",
          "a comma-separated list of distinct methods among {method}",
          lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(map(_registered("method"), v))),
    Param("jobs", "int", 2, "points of a sweep (trials of a search) trained at once, each in its own worker process "
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
    Param("space", "space", (), "what a search tunes: NAME=LOW:HIGH (a range; whole numbers for an integer "
          "parameter), NAME=LOW:HIGH:log (on a log scale) or NAME=V1,V2 (a choice), separated by ';', over the "
          "parameters of the study that the search's trials train (student_arch, the training parameters, alpha, "
          "kd_temperature, method, a method's own)",
          "NAME=LOW:HIGH;NAME=LOW:HIGH:log;NAME=V1,V2 with each NAME a parameter the trials train",
          lambda v: len(v) >= 1),
    Param("tune", "space", (), "make the sweep a fair verdict: first give every arm (each teacher weight x "
          "method, and the student without KD when the space holds a student's parameter) trials= trials of this "
          "space, chosen on a holdout of the training split, then train each arm's choice on the seeds; written "
          "as space= (the students' parameters: student_arch, student.lr and the student's other training "
          "parameters, alpha, kd_temperature, a method's own)",
          "NAME=LOW:HIGH;NAME=LOW:HIGH:log;NAME=V1,V2 with each NAME a parameter of the students",
          lambda v: len(v) >= 1),
    Param("trials", "int", 20, "trials of a search (of each arm of a tuned sweep): each trains one configuration "
          "the sampler asks for",
          "an integer >= 1", lambda v: v >= 1),
    Param("sampler", "str", "tpe", "Optuna's sampler: tpe, random, cmaes or grid (every combination of "
          "the space's choices, which must then all be lists)", "tpe, random, cmaes or grid",
          _choice(lambda: list(SAMPLERS))),
    Param("prune", "str", "median", "stop a trial whose holdout accuracy after an epoch is hopeless: median "
          "(Optuna's MedianPruner), halving (SuccessiveHalvingPruner) or none", "median, halving or none",
          _choice(lambda: list(PRUNERS))),
    Param("holdout", "float", 0.1, "the fraction of the training split a search's trials are evaluated on "
          "(stratified, fixed seed) and leave out of their training; the validation split is never computed "
          "for a trial", "a number above 0 and below 0.5", lambda v: 0 < v < 0.5),
    Param("name", "str", "", "the search's name in its Optuna storage (default: its run's id); two searches "
          "of one name on one storage are refused", "a name of at most 256 characters", lambda v: len(v) <= 256),
    Param("storage", "str", "", "where the search's Optuna study lives (default: optuna.log beside a "
          "file or SQLite tracking store): a journal file path, sqlite:///PATH or postgresql://... "
          "(a database of its own, not MLflow's)"),
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
        "sweep": tuple(n for n in COMMON if n != "seed") + study + ("seeds", "weights", "methods", "axes", "jobs",
                                                                     "threads") + CLUSTER
        + ("tune", "trials", "sampler", "prune", "holdout", "storage", "force", "resume"),
        "search": tuple(n for n in COMMON if n != "register_as") + (
            "student_arch", "teacher", "student", "partner_data", "trust_unverified", "teacher_arch", "weight",
            "temperature",
            "method", "alpha", "kd_temperature") + own
        + ("space", "trials", "sampler", "prune", "holdout", "name", "storage", "jobs", "threads") + CLUSTER
        + ("resume",),
    }


def __getattr__(name: str) -> Any:
    """``PARAMS``, ``METHOD_PARAMS`` and ``STAGE_PARAMS``, complete once the methods have declared theirs."""
    tables = {"PARAMS": params, "METHOD_PARAMS": method_param_names, "STAGE_PARAMS": stage_params}
    if name in tables:
        return tables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


STAGE_DEFAULTS = {"teach": {"arch": "cnn"}}  # where a stage differs from the table
def under_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (or ttkd's launcher)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def check_ray() -> None:
    """Ray, the optional extra that ``cluster=`` needs, is installed."""
    if importlib.util.find_spec("ray") is None:
        raise TTKDError("cluster= needs Ray, an optional extra: pip install -e '.[cluster]'")


def check_optuna() -> None:
    """Optuna, the optional extra that a search needs, is installed."""
    if importlib.util.find_spec("optuna") is None:
        raise TTKDError("a search needs Optuna, an optional extra: pip install -e '.[search]'")


def check_processes(methods, several: bool) -> None:
    """Refuse a method that cannot train as ``several`` processes of one stage."""
    if several and "crd" in methods:
        raise TTKDError("crd keeps a memory bank per process, which several processes would split; "
                        "run crd with nproc=1")
