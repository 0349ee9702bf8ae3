"""MLflow model references and registration (promotion: ``ttkd.tracking.promotion``).

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
        check_registered(client, name)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            aliases = sorted(client.get_registered_model(name).aliases)
            raise TTKDError(f"model {name!r} has no alias {alias!r}; its aliases are: "
                            f"{', '.join(aliases) or '(none)'}") from None
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        check_registered(client, name)
        versions = sorted_versions(client, name)
        mv = next((v for v in versions if str(v.version) == version), None)
        if mv is None:
            raise TTKDError(f"model {name!r} has no version {version!r}; its versions are: "
                            f"{', '.join(str(v.version) for v in versions)}")
    else:
        name = ref
        check_registered(client, name)
        try:
            mv = client.get_model_version_by_alias(name, DEFAULT_ALIAS)
        except MlflowException:
            versions = sorted_versions(client, name)
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

def check_registered(client: MlflowClient, name: str) -> None:
    """Refuse a name no model is registered under, listing those that are."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=1000))
        raise TTKDError(f"no registered model named {name!r}; registered models: "
                        f"{', '.join(known) or '(none: run the baseline stage first)'}") from None


def sorted_versions(client: MlflowClient, name: str) -> list:
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
