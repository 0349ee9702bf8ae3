"""MLflow model references, registration and promotion.

A model reference is one of
    NAME                 the version holding alias ``champion``, else the newest version
    NAME@ALIAS           the version an alias points at
    NAME/VERSION         one version
    models:/...          any MLflow model URI (the three forms above, or a logged model id)
    runs:/RUN_ID/PATH    a model logged by a run, registered or not
:func:`resolve` turns a reference into a :class:`ModelRef`; a registered one always
ends up pinned as ``models:/NAME/VERSION``, which is what lineage tags record.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import re
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ttkd.errors import TTKDError

DEFAULT_ALIAS = "champion"
TAG_PARTNER = "ttkd.partner_model"  # on a version: the pinned reference of the partner it trained beside
HEALTH_TIMEOUT_S = 5.0  # how long an http(s) tracking server gets to answer before we give up
DB_TIMEOUT_S = 5.0  # and a database server
DATABASES = ("postgresql", "mysql", "mssql")  # tracking stores MLflow keeps in a database server
_SCHEMA_LOCK = 0x7474_6B64  # PostgreSQL advisory lock held while MLflow creates its tables
_ILLEGAL_NAME = re.compile(r"[/@:'\"\\\x00-\x1f]")  # separators, quotes and control characters
MAX_NAME = 256  # characters of a registered model's name or alias that MLflow's tables hold (PostgreSQL: varchar)


def prepare_store() -> None:
    """Make the tracking store ready before any work, so failures come early and once.

    A SQLite store gets its schema created under a file lock: several processes creating
    the same fresh store at once would otherwise fail. An http(s) server must answer its
    health check within ``HEALTH_TIMEOUT_S`` (MLflow itself would retry for minutes).
    """
    uri = mlflow.get_tracking_uri()
    if uri.split(":", 1)[0].split("+")[0] in DATABASES:
        _prepare_database(uri)
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?")[0])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(path.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                retry_locked(lambda: MlflowClient().search_experiments(max_results=1))
        except OSError as exc:
            raise TTKDError(f"cannot use the tracking store {uri} ({exc.strerror or exc}: {exc.filename}); "
                            f"set MLFLOW_TRACKING_URI to sqlite:///PATH in a folder you can write") from None
        except Exception as exc:  # SQLAlchemy's or MLflow's: the file is not an MLflow database
            raise TTKDError(f"cannot use the tracking store {uri} ({first_line(exc)[:200]}); set MLFLOW_TRACKING_URI "
                            f"to a new file or to an MLflow database") from None
    elif uri.startswith(("http://", "https://")):
        import requests
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S).raise_for_status()
        except requests.RequestException as exc:
            raise TTKDError(f"cannot reach the tracking server {uri} ({type(exc).__name__}); start it "
                            f"(mlflow server) or set MLFLOW_TRACKING_URI to a reachable store") from None


def _prepare_database(uri: str) -> None:
    """A database server as the store (``postgresql://USER:PASSWORD@HOST:PORT/DB``, or
    another SQLAlchemy URI MLflow takes): its driver installed, the server answering and the
    password right within ``DB_TIMEOUT_S``, and MLflow's schema created by one process at a
    time (PostgreSQL: under an advisory lock), so that failures come early as one line."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    shown = url.render_as_string(hide_password=True)
    try:
        url.get_dialect().import_dbapi()
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise TTKDError(f"the tracking store {shown} needs a database driver that is not installed "
                        f"({exc}); for PostgreSQL: pip install -e '.[server]'") from None
    timeout = {"connect_timeout": int(DB_TIMEOUT_S)} if url.get_driver_name() in ("psycopg2", "psycopg") else {}
    engine = sqlalchemy.create_engine(url, connect_args=timeout, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            if url.get_backend_name() == "postgresql":
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK})
            MlflowClient().search_experiments(max_results=1)  # creates or upgrades the schema
    except sqlalchemy.exc.OperationalError as exc:
        reason = " ".join(str(exc.orig).split()).removeprefix("connection failed: ")
        raise TTKDError(f"cannot connect to the tracking database {shown} ({reason}); start the database "
                        f"server, or fix MLFLOW_TRACKING_URI (host, port, user, password, database)") from None
    finally:
        engine.dispose()  # closing the connection releases the lock


def retry_locked(call, attempts: int = 8, first_wait_s: float = 0.2, transient=("database is locked",)):
    """Run ``call()``, retrying with exponential backoff while it fails with one of the
    ``transient`` messages (by default: SQLite says it is locked)."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if not any(m in str(exc) for m in transient) or attempt == attempts - 1:
                raise
            time.sleep(first_wait_s * 2**attempt)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A resolved model: ``uri`` loads it; ``name``/``version`` are set when it is registered."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None

    def __str__(self) -> str:
        return self.uri


def check_model_name(name: str, what: str = "model name") -> None:
    """Refuse a registered-model (or alias) name that model references could not address,
    or that the registry cannot store."""
    if not name or _ILLEGAL_NAME.search(name):
        raise TTKDError(f"invalid {what} {name!r}: use a non-empty name without '/', '@' or ':' (they separate "
                        f"versions, aliases and URI schemes), quotes, backslashes or control characters (registry "
                        f"searches quote names)")
    if len(name) > MAX_NAME:
        raise TTKDError(f"invalid {what} {name[:40]}… ({len(name)} characters): the registry keeps names of at most "
                        f"{MAX_NAME} characters; choose a shorter register_as")


def resolve(reference: str, client: MlflowClient | None = None) -> ModelRef:
    """Resolve a model reference (forms in the module docstring) against the registry."""
    client = client or MlflowClient()
    ref = reference.strip()
    if not ref:
        raise TTKDError("empty model reference; give NAME, NAME@ALIAS, NAME/VERSION, "
                        "models:/... or runs:/...")
    if ref.startswith("runs:/"):
        return _check_loadable(ModelRef(uri=ref, run_id=ref[len("runs:/"):].split("/")[0]))
    if ref.startswith("models:/"):
        ref = ref[len("models:/"):]
        if ref.startswith("m-") and "/" not in ref and "@" not in ref:  # a logged model id
            return _check_loadable(ModelRef(uri=reference.strip()))
    if "@" in ref:
        name, alias = ref.split("@", 1)
        _registered(client, name)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            aliases = sorted(client.get_registered_model(name).aliases)
            raise TTKDError(f"model {name!r} has no alias {alias!r}; its aliases are: "
                            f"{', '.join(aliases) or '(none)'}") from None
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        _registered(client, name)
        versions = _versions(client, name)
        mv = next((v for v in versions if str(v.version) == version), None)
        if mv is None:
            raise TTKDError(f"model {name!r} has no version {version!r}; its versions are: "
                            f"{', '.join(str(v.version) for v in versions)}")
    else:
        name = ref
        _registered(client, name)
        try:
            mv = client.get_model_version_by_alias(name, DEFAULT_ALIAS)
        except MlflowException:
            versions = _versions(client, name)
            if not versions:
                raise TTKDError(f"model {name!r} has no versions; register one first") from None
            mv = versions[-1]
    return ModelRef(uri=f"models:/{mv.name}/{mv.version}", name=mv.name,
                    version=str(mv.version), run_id=mv.run_id)



def versions(name: str, students: bool = False) -> list:
    """Every version of model ``name``; with ``students``, then every version distilled from one of them."""
    client = MlflowClient()
    found = client.search_model_versions(f"name = '{name}'", max_results=10000)
    if students:
        found += [s for v in found for s in client.search_model_versions(
            f"tags.`{TAG_PARTNER}` = 'models:/{name}/{v.version}'", max_results=10000)]
    return found

def _registered(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=1000))
        raise TTKDError(f"no registered model named {name!r}; registered models: "
                        f"{', '.join(known) or '(none: run the baseline stage first)'}") from None


def _versions(client: MlflowClient, name: str) -> list:
    """All versions of ``name``, oldest first."""
    found = client.search_model_versions(f"name = '{name}'", max_results=10000)
    return sorted(found, key=lambda v: int(v.version))


def _check_loadable(ref: ModelRef) -> ModelRef:
    try:
        mlflow.models.get_model_info(ref.uri)
    except (MlflowException, OSError) as exc:
        raise TTKDError(f"cannot find a model at {ref.uri} ({first_line(exc)}); "
                        f"check the run id and artifact path") from None
    return ref


def first_line(exc: BaseException) -> str:
    """An exception's first line, whole (a one-line message must not end mid-word)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def register(model_uri: str, name: str, tags: dict[str, str]) -> ModelRef:
    """Register ``model_uri`` as a new version of ``name`` with ``tags``, all or nothing.

    The tags are written with the version; if that fails the half-made version is
    deleted again and the error is raised.
    """
    check_model_name(name)
    client = MlflowClient()
    mv = retry_locked(lambda: mlflow.register_model(model_uri, name, tags=tags))
    try:
        missing = set(tags) - set(client.get_model_version(name, mv.version).tags)
        if missing:
            raise RuntimeError(f"tags {sorted(missing)} were not stored")
    except Exception:
        client.delete_model_version(name, mv.version)
        raise
    return ModelRef(uri=f"models:/{name}/{mv.version}", name=name, version=str(mv.version),
                    run_id=mv.run_id)


def versions_of_run(run_id: str) -> list[ModelRef]:
    """The versions registered from run ``run_id``'s model, oldest first."""
    if not re.fullmatch(r"[0-9a-zA-Z_-]+", run_id):
        return []
    found = sorted(MlflowClient().search_model_versions(f"run_id = '{run_id}'"), key=lambda v: int(v.version))
    return [ModelRef(uri=f"models:/{v.name}/{v.version}", name=v.name, version=str(v.version), run_id=run_id)
            for v in found]


@dataclasses.dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did: the alias moved from ``old`` to ``new`` (or not)."""

    name: str
    alias: str
    metric: str
    old: str | None          # version that held the alias before, if any
    old_value: float | None
    new: str
    new_value: float
    moved: bool
    evidence: tuple[str, ...] = ()   # by students: one line per version

    def __str__(self) -> str:
        new = f"version {self.new} ({self.metric} {self.new_value:.4g})"
        old = ("(unset)" if not self.old else f"version {self.old}" + (
            f" ({self.metric} {self.old_value:.4g})" if self.old_value is not None else " (not judged here)"))
        line = (f"{self.name}@{self.alias} unchanged: already {new}" if not self.moved
                else f"{self.name}@{self.alias}: {old} -> {new}")
        return "\n".join(self.evidence + (line,))


def lower_is_better(metric: str) -> bool:
    """Metrics named like losses or errors are minimised; everything else is maximised."""
    return any(word in metric for word in ("loss", "error", "time"))


BUDGETS = {"max_latency_ms": ("ttkd.latency_ms_b1_cpu", "ms per image at batch 1 on the CPU"),
           "max_params": ("ttkd.params", "parameters")}


def within(version, budget: dict[str, float]) -> bool:
    """Whether a version's measured cost (its tags) is within ``budget`` (BUDGETS' keys)."""
    return all(float(version.tags[BUDGETS[k][0]]) <= limit for k, limit in budget.items())


def unmeasured(versions, budget: dict[str, float]) -> list[str]:
    """The versions among ``versions`` that lack a figure ``budget`` needs."""
    return [str(v.version) for v in versions if any(BUDGETS[k][0] not in v.tags for k in budget)]


def promote(reference: str, metric: str = "val_acc", alias: str = DEFAULT_ALIAS,
            force: bool = False, by: str = "self", student_arch: str = "", method: str = "",
            budget: dict[str, float] | None = None) -> Promotion:
    """Point ``alias`` at a version of a registered model, judged by ``metric``.

    ``reference`` is ``NAME`` (pick the best version by the metric, as logged last by
    the run that made it) or a pinned ``NAME/VERSION`` / ``NAME@ALIAS`` (that version).
    A version worse than the alias's current holder is refused unless ``force``.

    ``by="students"`` judges a teacher by how well it teaches: a version's score is the
    mean ``metric`` of the students distilled from it (registered versions whose
    ``ttkd.partner_model`` tag names it), only those of ``student_arch`` and ``method``
    if given. Versions that taught no such student are left out.

    ``budget`` (``max_latency_ms``, ``max_params``) leaves out every version whose
    measured cost exceeds it (with ``by="students"``: every student); none within it is
    refused, naming the cheapest version's figure.
    """
    if by not in ("self", "students"):
        raise TTKDError(f"invalid by {by!r}: use self (the version's own {metric}) or students "
                        f"(the mean {metric} of the students it taught)")
    prepare_store()
    client = MlflowClient()
    ref = reference.strip().removeprefix("models:/")
    name = re.split(r"[/@]", ref, maxsplit=1)[0]
    if not re.fullmatch(r"[A-Za-z_][\w-]*", alias) or re.fullmatch(r"v\d+", alias):
        raise TTKDError(f"invalid alias {alias!r}: use letters, digits, '_' or '-', not starting "
                        f"with a digit; v<number> is reserved by MLflow")
    if len(alias) > MAX_NAME:
        raise TTKDError(f"invalid alias {alias[:40]}… ({len(alias)} characters): the registry keeps aliases of at "
                        f"most {MAX_NAME} characters; choose a shorter alias")
    _registered(client, name)
    evidence: tuple[str, ...] = ()
    budget = budget or {}
    for key, limit in budget.items():
        if key not in BUDGETS or not (isinstance(limit, int | float) and math.isfinite(limit) and limit > 0):
            raise TTKDError(f"invalid {key}: {limit!r}; give a number > 0")
    if by == "students":
        scored, evidence = _teaching_scores(client, name, metric, student_arch, method, budget)
        label = f"students' mean {metric}"
    else:
        versions = _versions(client, name)
        if budget:
            _check_measured(name, versions, budget)
            fits = [v for v in versions if within(v, budget)]
            if not fits:
                raise TTKDError(_nothing_within(name, versions, budget))
            versions = fits
        scores = {str(v.version): _score(client, v, metric) for v in versions}
        scored = {v: s for v, s in scores.items() if s is not None}
        label = metric
        if not scored:
            raise TTKDError(f"no version of {name!r} has a metric {metric!r}; "
                            f"pick a metric its runs logged, such as val_acc")
    sign = -1 if lower_is_better(metric) else 1
    if ref == name:
        target = max(scored, key=lambda v: (sign * scored[v], int(v)))
    else:
        target = resolve(ref, client).version
        if target not in scored and by == "students":
            raise TTKDError(f"{name} version {target} has taught no student{_which(student_arch, method)}; "
                            f"distil one from it first, or choose another version")
        if target not in scored:
            raise TTKDError(f"{name} version {target} has no metric {metric!r}; choose another")
    try:
        current = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        current = None
    old_value = scored.get(current)
    if current == target:
        return Promotion(name, alias, label, current, old_value, target, scored[target], False, evidence)
    if old_value is not None and sign * scored[target] < sign * old_value and not force:
        raise TTKDError(
            f"refusing to move {name}@{alias} from version {current} ({label} {old_value:.4g}) "
            f"to the worse version {target} ({label} {scored[target]:.4g}); pass force=true to do it anyway")
    retry_locked(lambda: client.set_registered_model_alias(name, alias, target))
    return Promotion(name, alias, label, current, old_value, target, scored[target], True, evidence)


def _which(student_arch: str, method: str) -> str:
    parts = [f"arch {student_arch}" if student_arch else "", f"method {method}" if method else ""]
    return f" ({', '.join(p for p in parts if p)})" if student_arch or method else ""


def _check_measured(name: str, versions, budget: dict[str, float]) -> None:
    missing = unmeasured(versions, budget)
    if missing:
        model = versions[0].name
        raise TTKDError(f"{name}: version{'s' * (len(missing) > 1)} {', '.join(missing)} of {model} "
                        f"{'have' if len(missing) > 1 else 'has'} no measured cost (registered before ttkd "
                        f"measured it); measure them with `mlflow run . -e promote -P model={model} -P measure=true`")


def _nothing_within(name: str, versions, budget: dict[str, float]) -> str:
    key = next(iter(budget))
    tag, what = BUDGETS[key]
    best = min(versions, key=lambda v: float(v.tags[tag]))
    return (f"no version of {name} is within {', '.join(f'{k}={v:g}' for k, v in budget.items())}; the "
            f"{'fastest' if key == 'max_latency_ms' else 'smallest'} is {best.name} version {best.version} at "
            f"{float(best.tags[tag]):.4g} {what}")


def _teaching_scores(client: MlflowClient, name: str, metric: str, student_arch: str,
                     method: str, budget: dict[str, float] | None = None) -> tuple[dict[str, float], tuple[str, ...]]:
    """Per version of teacher ``name``: the mean ``metric`` of the students it taught
    (only those within ``budget``); and one line of evidence per version."""
    budget = budget or {}
    students = []
    versions = _versions(client, name)
    if not any(v.tags.get("ttkd.stage") == "teach" for v in versions):
        made = sorted({v.tags.get("ttkd.stage", "outside ttkd") for v in versions})
        raise TTKDError(f"{name!r} is not a teacher (its versions come from: {', '.join(made)}); "
                        f"by=students judges models made by the teach stage")
    scored, lines = {}, [f"{name}: each version judged by the {metric} of the students it taught"
                         f"{_which(student_arch, method)}"]
    for v in versions:
        taught = client.search_model_versions(f"tags.`{TAG_PARTNER}` = 'models:/{name}/{v.version}'",
                                              max_results=10000)
        mine = [sv for sv in taught if sv.tags.get("ttkd.stage") == "distill"
                and (not student_arch or sv.tags.get("ttkd.arch") == student_arch)
                and (not method or sv.tags.get("ttkd.method") == method)]
        if budget and mine:
            _check_measured(f"the students of {name} version {v.version}", mine, budget)
        students += mine
        values = [s for sv in mine if (not budget or within(sv, budget))
                  and (s := _score(client, sv, metric)) is not None]
        point = ", ".join(f"{k} {v.tags[f'ttkd.{k}']}" for k in ("seed", "weight") if f"ttkd.{k}" in v.tags)
        about = f"  version {v.version}" + (f" ({point})" if point else "")
        if values:
            scored[str(v.version)] = sum(values) / len(values)
            lines.append(f"{about}: {len(values)} student{'s' * (len(values) > 1)}, "
                         f"mean {metric} {scored[str(v.version)]:.4g}")
        else:
            lines.append(f"{about}: {'no student within the budget' if budget and mine else 'taught no student'}, "
                         f"left out")
    if not scored and budget and students:
        raise TTKDError(_nothing_within(f"the students of {name}", students, budget))
    if not scored:
        raise TTKDError(f"no version of {name!r} has taught a student{_which(student_arch, method)}; "
                        f"distil one from it first (the distill stage, or a sweep)")
    return scored, tuple(lines)


def _score(client: MlflowClient, version, metric: str) -> float | None:
    if not version.run_id:
        return None
    try:
        value = client.get_run(version.run_id).data.metrics.get(metric)
    except MlflowException:
        return None  # the run was deleted
    return value if value is not None and math.isfinite(value) else None
