"""A search's Optuna study as the search and its trials share it: where it lives, the sampler
and the pruner by name, and the callback through which a trial, wherever it trains, reports
its holdout accuracy after each epoch and learns whether its pruner stops it.

Optuna is an optional extra (``pip install -e '.[search]'``), imported only when a search or
one of its trials runs.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
import warnings
from pathlib import Path

from ttkd import tracking
from ttkd.callbacks import Callback, StopTraining
from ttkd.engine import EpochStats
from ttkd.errors import TTKDError
from ttkd.parsing import Space

TAG_PRUNED = "ttkd.pruned"  # a trial its pruner stopped: the last epoch it trained
STORAGE_FILE = "optuna.log"  # a study's storage beside a local tracking store


@dataclasses.dataclass(frozen=True)
class Report:
    """Where a trial reports: its study (``name`` in ``storage``), its id there and the pruner."""

    storage: str
    name: str
    trial_id: int
    number: int
    prune: str
    epochs: int      # the trial's last epoch, which its pruner never stops: the trial is done by then


def optuna():
    """Optuna, quiet: ttkd prints a line per trial, and Optuna's experimental features are used knowingly."""
    import optuna as optuna_

    optuna_.logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna_.exceptions.ExperimentalWarning)
    return optuna_


def storage(url: str):
    """The Optuna storage at ``url``: a database (``sqlite:``, ``postgresql:``, ``mysql:``), else a
    journal file, which worker processes on one machine (or on a shared file system) append to
    under a lock."""
    o = optuna()
    if url.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql"):
        return o.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend

    return o.storages.JournalStorage(JournalFileBackend(url))


def storage_url(given: str) -> str:
    """Where the search's Optuna study lives: ``given``, else ``optuna.log`` beside a file or
    SQLite tracking store. A tracking server's store is not this machine's to write beside:
    a search on one needs ``storage=``."""
    if given:
        return given if "://" in given or given.startswith("sqlite:") else str(Path(given).resolve())
    uri = tracking.tracking_uri()
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / STORAGE_FILE)
    if parsed.scheme in ("", "file"):
        return str(Path(parsed.path).resolve().parent / STORAGE_FILE)
    raise TTKDError(f"a search keeps its Optuna study in a storage of its own, and the tracking store is {uri}: "
                    f"give storage= (a database of its own on your PostgreSQL server, postgresql://..., or a file "
                    f"every machine of the search can reach)")


def check_storage(url: str) -> None:
    """Refuse MLflow's own database as the study's: both keep an ``alembic_version`` table."""
    if url.split(":", 1)[0].split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise TTKDError(f"storage={url} cannot be opened ({str(exc).splitlines()[0]}); give a database that "
                        f"exists, or a file path") from None
    finally:
        engine.dispose()
    if {"experiments", "runs"} <= tables:
        raise TTKDError(f"storage={url} holds MLflow's tracking tables, and Optuna and MLflow each keep an Alembic "
                        f"version table there; give the search a database of its own (CREATE DATABASE ...)")


def pruner(name: str):
    """Optuna's pruner ``median``, ``halving`` or ``none``, with its own defaults."""
    o = optuna()
    return {"median": o.pruners.MedianPruner, "halving": o.pruners.SuccessiveHalvingPruner,
            "none": o.pruners.NopPruner}[name]()


def sampler(name: str, seed: int, space: Space):
    """Optuna's sampler ``name``, seeded with ``seed`` (``grid``: over ``space``'s choices)."""
    o = optuna()
    if name == "grid":
        return o.samplers.GridSampler({n: list(d.choices) for n, d in space}, seed=seed)
    return {"tpe": o.samplers.TPESampler, "random": o.samplers.RandomSampler,
            "cmaes": o.samplers.CmaEsSampler}[name](seed=seed)


def reporter(report: Report) -> Callback:
    """After each epoch: the trial's holdout accuracy reported to its study at step = epoch;
    :class:`StopTraining` when its pruner stops it there."""
    o = optuna()
    study = o.load_study(study_name=report.name, storage=storage(report.storage), pruner=pruner(report.prune))
    trial = o.trial.Trial(study, report.trial_id)
    first = True

    def on_epoch(s: EpochStats, engine: dict) -> None:
        nonlocal first
        earlier = {}
        if first and s.epoch > 1:  # a continued trial: first what its run logged before, since an attempt
            # stopped between an epoch's metrics and its report left that epoch out of the study
            earlier = tracking.metric_by_step(tracking.active_run_id(), "holdout_acc")
        first = False
        with warnings.catch_warnings():  # an epoch reported already: Optuna keeps the first value
            warnings.simplefilter("ignore")
            for step, value in sorted(earlier.items()):
                if step < s.epoch:
                    trial.report(value, step)
            trial.report(s.val_acc, s.epoch)
        if s.epoch < report.epochs and trial.should_prune():
            raise StopTraining(f"trial {report.number} pruned after epoch {s.epoch} (holdout_acc {s.val_acc:.2f}%)",
                               s.epoch, {TAG_PRUNED: str(s.epoch)})
    return on_epoch
