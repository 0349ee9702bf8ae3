"""Real servers for the team tests, on 127.0.0.1 only: PostgreSQL from the binaries that
the pgserver wheel ships, and ``mlflow server`` in front of it. PostgreSQL refuses to run
as root, so as root its processes run as a system user made for them."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

USER, PASSWORD = "ttkd", "team-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[PostgreSQL]:
    """A PostgreSQL server on 127.0.0.1 with password login, its data under ``root``."""
    from pgserver import utils
    from pgserver._commands import POSTGRES_BIN_PATH as bin_dir

    run_as = {}
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        user = "ttkd-postgres"
        utils.ensure_user_exists(user)
        utils.ensure_prefix_permissions(bin_dir)  # the server's user must reach its binaries
        utils.ensure_folder_permissions(bin_dir.parent, 0o055)
        utils.ensure_prefix_permissions(root)
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = {"user": user}
    (root / "password").write_text(PASSWORD + "\n")
    server = PostgreSQL(bin_dir, root, free_port(), run_as)
    subprocess.run([bin_dir / "initdb", "-D", root / "data", "-U", USER, f"--pwfile={root / 'password'}",
                    "--auth=scram-sha-256", "--encoding=utf8", "--locale=C"],
                   check=True, capture_output=True, cwd=root, **run_as)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class PostgreSQL:
    def __init__(self, bin_dir: Path, root: Path, port: int, run_as: dict):
        self.bin_dir, self.root, self.port, self.run_as = bin_dir, root, port, run_as

    def uri(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._ctl("-w", "-l", self.root / "log", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root}", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def create_database(self, name: str) -> str:
        subprocess.run([self.bin_dir / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", "postgres",
                        "-q", "-c", f'CREATE DATABASE "{name}"'],
                       check=True, capture_output=True, env={**os.environ, "PGPASSWORD": PASSWORD})
        return self.uri(name)

    def _ctl(self, *args) -> None:
        subprocess.run([self.bin_dir / "pg_ctl", "-D", self.root / "data", *args],
                       check=True, capture_output=True, cwd=self.root, **self.run_as)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path) -> Iterator[str]:
    """``mlflow server`` on ``backend`` serving the artifacts under ``artifacts``; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(artifacts.parent / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(artifacts.parent / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
