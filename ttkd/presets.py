"""How a stage's parameters combine: the command line, the preset (``experiments/NAME.toml``,
with ``extends``), the stage's own default and the table's (``ttkd.config``), checked alike
from every source into a :class:`RunConfig`; and what resuming a run may change.

A study preset (``stage = "main"``) may set training parameters per role in ``[student]``
and ``[teacher]`` tables; top-level values apply to both roles, and a value given on the
command line overrides both. A sweep (``stage = "sweep"``) takes the study's parameters with
``seeds``, ``weights`` and ``methods`` in place of ``seed``, ``weight`` and ``method``; it
also runs a study preset, whose ``weight`` and ``method`` become the sweep's defaults
``weights = 0,WEIGHT`` and ``methods = METHOD``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from ttkd.config import (
    FREE_ON_RESUME,
    LAUNCH,
    MAX_MODELS,
    STAGE_DEFAULTS,
    STAGES,
    TRAIN,
    Param,
    TrainConfig,
    check_optuna,
    check_processes,
    check_ray,
    method_param_names,
    method_uses,
    params,
    stage_params,
    under_torchrun,
)
from ttkd.errors import TTKDError
from ttkd.parsing import Dist, axes_text, axis_home, axis_roles, parse, space_text

SWEEP_FROM_STUDY = {"weight": "weights", "method": "methods"}  # a study preset's values in a sweep
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
        if "register_as" in kw:
            kw["register_as"] = kw["register_as"] or None
        if "method" in kw or "methods" in kw:  # a method's own parameters travel as one dict
            distill_t = ("temperature",) if self.stage == "distill" else ()
            for name in ("alpha", "kd_temperature", *method_param_names(), *distill_t):
                kw.pop(name, None)
            params = {m: {n: self.values[k] for n, k in zip(method_uses(m), method_params(self.stage, m))}
                      for m in run_methods(self.stage, self.values)}
            kw["method_params"] = params[kw["method"]] if "method" in kw and self.stage != "search" else params
        if self.stage == "sweep":
            kw.pop("force")
            kw["weights"] = tuple(sorted(set(kw["weights"]) | {0.0}))
        if self.stage in ("main", "sweep"):
            return kw | {"student_train": self.train["student"], "teacher_train": self.train["teacher"]}
        if self.stage == "search":
            kw["teacher"] = kw["teacher"] or None
            kw["student"] = kw["student"] or None
            kw["methods"] = run_methods(self.stage, self.values)
        return kw | {"train": self.train[""]}


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


def _settings_for(stage: str, preset: str) -> dict:
    """A preset's settings for ``stage``: a study preset's weight and method become a sweep's
    defaults; a preset for another stage is refused."""
    preset_for, settings = load_preset(preset)
    if stage == "sweep" and preset_for == "main":
        if "seed" in settings:
            raise TTKDError(f"preset {preset!r} sets seed; a sweep takes seeds instead "
                            f"(-P seeds=N or a list)")
        for one, many in SWEEP_FROM_STUDY.items():
            if one in settings:
                value = settings.pop(one)
                settings[many] = [0.0, value] if one == "weight" else [value]
    elif preset_for != stage:
        raise TTKDError(f"preset {preset!r} is for the {preset_for} stage; run it with "
                        f"-e {preset_for}" + ("" if preset_for == "sweep" else " (or with the main entry point)"))
    return settings


def _check_sweep(values: dict, named: set[str], several: bool) -> None:
    """A sweep's own checks: its axes against its other parameters (``named``: those the user
    set), where it runs, its jobs under several processes (forced to 1), and the number of
    versions it registers."""
    _check_axes(values, named)
    _check_tune(values, named)
    _check_cluster(values, named, several)
    if several:
        if values["jobs"] > 1 and "jobs" in named:
            raise TTKDError(f"jobs={values['jobs']} with nproc={values['nproc']}: a sweep trained by "
                            f"several processes runs its points one at a time; drop jobs")
        values["jobs"] = 1
    count = sweep_size(values["seeds"], set(values["weights"]) | {0.0}, values["methods"], values["axes"])
    count += (1 + len(set(values["weights"]) | {0.0})) if values["tune"] else 0  # the tuning's student, teachers
    if count > MAX_MODELS and not values["force"]:
        raise TTKDError(f"this sweep would register {count} model versions (more than {MAX_MODELS}); "
                        f"pass force=true to run it, or use fewer seeds, weights, methods or axis values")


def resolve(stage: str, given: dict[str, Any], preset: str | None = None) -> RunConfig:
    """Combine command-line values ``given`` (None or "" = not given), the preset and the
    defaults into a checked :class:`RunConfig` for ``stage``."""
    settings = _settings_for(stage, preset) if preset else {}
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
        _check_method_params(stage, run_methods(stage, values), set(cli) | set(settings))
    several = values["nproc"] * values["nnodes"] > 1 or under_torchrun()
    if stage == "sweep":
        _check_sweep(values, set(cli) | set(settings), several)
    if stage == "search":
        _check_search(values, set(cli) | set(settings), several)
    check_processes(run_methods(stage, values), several)
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
                conflicts.append(f"{name}={_show(name, value)} (the run has {key}={logged[key]})")
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
    if param.kind == "seeds" and "," not in text:  # a sweep logs its seeds as a list: one seed is "3", not a count
        text += ","
    try:
        return parse(dataclasses.replace(param, valid=lambda v: True), text)
    except TTKDError:
        return None


def _canonical(name: str, value: Any) -> Any:
    return tuple(sorted(set(value) | {0.0})) if name == "weights" else value  # a sweep always has w = 0


def _show(name: str, value: Any) -> str:
    if name == "axes":
        return axes_text(value)
    if name in ("space", "tune"):
        return space_text(value)
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def method_params(stage: str, method: str) -> tuple[str, ...]:
    """The parameters of ``stage`` that ``method`` reads (in main, a sweep and a search,
    kd_temperature is the distill stages' temperature)."""
    names = method_uses(method)
    return tuple("kd_temperature" if stage in ("main", "sweep", "search") and n == "temperature" else n
                 for n in names)


def run_methods(stage: str, values: dict) -> tuple[str, ...]:
    """The KD methods a run of ``stage`` with ``values`` may train: a sweep's ``methods``, a
    search's choices of ``method`` in its space, else ``method``; none for a search without
    a teacher (its trials train the student alone)."""
    if stage == "search":
        if not values["teacher"] and not values["student"] and not values.get("resume") and not any(
                n == "method" or axis_roles(n) == {"kd"} for n, _ in values["space"]):
            return ()  # the student alone
        return dict(values["space"]).get("method", Dist(choices=(values["method"],))).choices
    return values.get("methods", (values.get("method"),))


def sweep_size(seeds, weights, methods, axes=()) -> int:
    """How many model versions a sweep registers: per seed a student, a teacher per weight
    and a KD student per weight and method, each times the values of the axes that feed it
    (a method's own parameter only for the methods that take it)."""
    def values(home: str, method: str | None = None) -> int:  # as ttkd.studies.space.own_axes crosses them
        return math.prod(len(v) for n, v in axes
                         if axis_home(n) == home and (method is None or n in method_params("sweep", method)))
    kd = sum(values("kd", m) for m in methods)
    return len(seeds) * values("student") * (1 + len(weights) * values("teacher") * (1 + kd))


def _check_axes(values: dict, named: set[str]) -> None:
    """An axis is not also a fixed parameter, and a method's parameter is an axis only for a
    sweep with a method that takes it."""
    for name, _ in values["axes"]:
        fixed = named & {name}  # (student.lr beside lr= is allowed: lr= sets the teacher's too)
        if fixed:
            raise TTKDError(f"{name} is both an axis and a parameter ({next(iter(fixed))}=); drop one of them")
        if axis_roles(name) == {"kd"} and not any(name in method_params("sweep", m) for m in values["methods"]):
            raise TTKDError(f"axis {name}: none of the methods {', '.join(values['methods'])} takes it; add a "
                            f"method that does to methods, or drop the axis")


def _check_search(values: dict, named: set[str], several: bool) -> None:
    """A search's own checks, before anything trains: its space against what its trials train
    (a KD student from ``teacher``; without one, from a teacher the search trains when the space
    holds a distillation parameter, else the student alone) and against the values given, its
    sampler against its space, where it runs; Optuna, its optional extra."""
    check_optuna()
    if values["resume"]:
        return  # the search's own values, read back from its run
    if not values["space"]:
        raise TTKDError("missing space: what the search tunes, like space='alpha=0.1:0.99;kd_temperature=1:16:log' "
                        "(-P space=...)")
    if values["teacher"] and values["student"]:
        raise TTKDError("teacher= searches a KD student from that teacher, student= searches the teacher trained "
                        "against that student; give one of them")
    own = sorted(named & {"teacher_arch", "weight", "temperature"})
    if own and (values["teacher"] or not run_methods("search", values)):
        why = "teacher= is given" if values["teacher"] else "the space holds no distillation parameter"
        raise TTKDError(f"{', '.join(own)} configure{'s' if len(own) == 1 else ''} the teacher a search trains "
                        f"when it has none, and {why}; drop {'it' if len(own) == 1 else 'them'}")
    for name, _ in values["space"]:
        roles = {"kd"} if name == "method" else {"teacher"} if name == "weight" else axis_roles(name)
        if not values["student"] and ("teacher" in roles and "student" not in roles or name.startswith("teacher.")):
            raise TTKDError(f"space: {name} feeds the teacher, which this search does not train; give "
                            f"student=NAME@ALIAS to search the teacher trained against that student, or search "
                            f"the KD student's parameters")
        fixed = named & ({name, name.rpartition(".")[2]} if name != "method" else {"method"})
        if fixed:
            raise TTKDError(f"{name} is both in the space and a parameter ({next(iter(fixed))}=); drop one of them")
        if roles == {"kd"} and name not in ("method", "alpha", "kd_temperature") and not any(
                name in method_params("search", m) for m in run_methods("search", values)):
            raise TTKDError(f"space: {name} is read by none of the methods "
                            f"{', '.join(run_methods('search', values))}; add a method that reads it "
                            f"(space method=…, or method=), or drop it")
    _check_sampler(values["space"], values["sampler"], values["trials"])
    _check_cluster(values, named, several)
    if several:
        raise TTKDError(f"a search trains each trial as one process; drop nproc={values['nproc']} (run trials in "
                        f"parallel with jobs=, or on a Ray cluster with cluster=)")


def _check_sampler(space, sampler: str, trials: int) -> None:
    """The grid sampler tries every combination of listed values: no range, no more trials than combinations."""
    if sampler != "grid":
        return
    ranges = [n for n, d in space if not d.choices]
    if ranges:
        raise TTKDError(f"sampler=grid tries every combination of values, and {', '.join(ranges)} "
                        f"{'is a range' if len(ranges) == 1 else 'are ranges'}: list the values "
                        f"(NAME=V1,V2), or use sampler=tpe|random|cmaes")
    size = math.prod(len(d.choices) for _, d in space)
    if trials > size:
        raise TTKDError(f"sampler=grid has {size} combinations and trials={trials}: ask for at "
                        f"most {size} trials, or use another sampler")


def _check_tune(values: dict, named: set[str]) -> None:
    """A tuned sweep's space: the students' parameters only (a teacher's, method or an axis
    are refused), none also given as a fixed value, each read by some arm; Optuna installed.
    (``ttkd.studies.tuning.check`` counts the arms.)"""
    search_only = sorted(named & {"trials", "sampler", "prune", "holdout", "storage"})
    if not values["tune"]:
        if search_only:
            raise TTKDError(f"{', '.join(search_only)} tune{'s' if len(search_only) == 1 else ''} a sweep's arms, "
                            f"and no tune= is given; add tune='alpha=0.1:0.99;kd_temperature=1:16:log' or drop "
                            f"{'it' if len(search_only) == 1 else 'them'}")
        return
    check_optuna()
    if values["axes"]:
        raise TTKDError("tune= with axes= is not supported: the verdict compares arms (weights x methods) each "
                        "at its own tuned configuration; run one tuned sweep per value of the axis")
    for name, _ in values["tune"]:
        roles = axis_roles(name) if name != "method" else set()
        if name == "method":
            raise TTKDError("tune: method is an arm of the verdict, not a parameter to tune; list the methods "
                            "to compare in methods= and drop method from tune")
        if "teacher" in roles:
            hint = f" (name the student's: student.{name})" if "student" in roles else ""
            raise TTKDError(f"tune: {name} feeds the teachers, and the verdict tunes the students' parameters"
                            f"{hint}; make {name} an axis of an untuned sweep (axes={name}=…) instead")
        fixed = named & {name}
        if fixed:
            raise TTKDError(f"{name} is both in tune and a parameter ({next(iter(fixed))}=); drop one of them")
        if roles == {"kd"} and name not in ("alpha", "kd_temperature") and \
                not any(name in method_params("sweep", m) for m in values["methods"]):
            raise TTKDError(f"tune: {name} is read by none of the methods {', '.join(values['methods'])}; add a "
                            f"method that reads it to methods, or drop it")
    _check_sampler(values["tune"], values["sampler"], values["trials"])


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
    _check_store(values["cluster"])


def _check_store(cluster: str) -> None:
    """A cluster's nodes log to the same tracking server: a store only this machine can
    read (a file or SQLite store, a local artifact folder) is refused before anything starts."""
    from ttkd import tracking  # (MLflow, only for a cluster sweep)

    uri = tracking.tracking_uri()
    if cluster == "local" or urllib.parse.urlparse(uri).scheme in ("http", "https", "databricks"):
        return
    raise TTKDError(f"cluster={cluster} needs a tracking server every node can reach, and the tracking store "
                    f"is {uri}, whose files or artifacts stay on this machine; start `mlflow server` (see "
                    f"docs/how-to/team-server.md) and set MLFLOW_TRACKING_URI=http://HOST:PORT here, or use "
                    f"cluster=local")


def _check_method_params(stage: str, methods: tuple[str, ...], given: set[str]) -> None:
    """Refuse a method parameter that the chosen method(s) would silently ignore."""
    own = {"alpha", "kd_temperature"} | set(method_param_names()) | ({"temperature"} if stage == "distill" else set())
    if not methods:  # a search without a teacher
        stray = sorted(given & (own | {"method"}))
        if stray:
            raise TTKDError(f"{', '.join(stray)} configure{'s' if len(stray) == 1 else ''} distillation, and no "
                            f"teacher is given: give teacher=NAME@ALIAS to search a KD student, or drop "
                            f"{'it' if len(stray) == 1 else 'them'}")
        return
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
