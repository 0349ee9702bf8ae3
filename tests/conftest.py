"""Shared fixtures: an isolated MLflow store per test, and a CLI runner that goes
through the same wrapper as ``python -m entry.NAME``."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch

torch.set_num_threads(2)
# the precision calibrations of this session's stages, apart from the user's own cache
os.environ.setdefault("TTKD_CACHE_DIR", tempfile.mkdtemp(prefix="ttkd-test-cache-"))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A SQLite tracking store as MLflow creates it, made once: creating its tables takes MLflow
    about 2 s, copying the file a few milliseconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store(tmp_path, monkeypatch, empty_store):
    """A fresh SQLite tracking store and artifact folder under ``tmp_path``; cwd moves there.
    It is a copy of ``empty_store`` whose Default experiment keeps its artifacts under
    ``tmp_path``, as one MLflow created here would."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (str(tmp_path / "mlruns" / "0"),))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set by the entry points the test ran in-process


@pytest.fixture()
def cli(capsys):
    """``cli("baseline", "--epochs", "1")`` -> (exit status, stdout, stderr)."""
    def invoke(name: str, *args: str):
        from entry.options import run

        command = importlib.import_module(f"entry.{name}").main
        capsys.readouterr()
        try:
            run(command, list(args))
            status = 0
        except SystemExit as exc:
            status = exc.code
        out, err = capsys.readouterr()
        return status, out, err
    return invoke
