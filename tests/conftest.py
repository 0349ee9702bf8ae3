"""Shared fixtures: an isolated MLflow store per test, and a CLI runner that goes
through the same wrapper as ``python -m entry.NAME``."""

from __future__ import annotations

import importlib
import os
import tempfile

import mlflow
import pytest
import torch

torch.set_num_threads(2)
# the precision calibrations of this session's stages, apart from the user's own cache
os.environ.setdefault("TTKD_CACHE_DIR", tempfile.mkdtemp(prefix="ttkd-test-cache-"))


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store and artifact folder under ``tmp_path``; cwd moves there."""
    monkeypatch.chdir(tmp_path)
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
