"""Real servers for the team tests, on 127.0.0.1 only: PostgreSQL from the binaries that
the pgserver wheel ships, and ``mlflow server`` in front of it. PostgreSQL refuses to run
as root, so as root its processes run as a system user made for them."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
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
        """Stop the server, its clients disconnected; one that has not shut down within 120 s
        (a machine loaded by other tests) is stopped at once: its data is thrown away anyway."""
        try:
            self._ctl("-m", "fast", "-t", "120", "stop")
        except subprocess.CalledProcessError:
            self._ctl("-m", "immediate", "stop")

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


# ---- a real Ray cluster of two nodes on this machine ----------------------------------------

RAY_ENV = {
    "RAY_AUTH_MODE": "token",             # Ray's token authentication, as docs/how-to/cluster.md starts nodes
    "RAY_AUTH_TOKEN": secrets.token_urlsafe(32),  # fresh for each test session
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "1000",  # a killed node is declared dead in seconds, not half a minute
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "2000",  # a node that stops answering (frozen) too: 10 s a check otherwise
    # a task's owner learns in seconds, not 7 minutes (Ray: 300 s + 120 s), that a frozen node's
    # connection is gone; every process of the cluster and the sweep must agree on the interval,
    # since Ray's servers turn away pings more frequent than their own setting
    "RAY_grpc_client_keepalive_time_ms": "2000",
    "RAY_grpc_client_keepalive_timeout_ms": "5000",
}


class RayNodes:
    """``ray start --head`` and one ``ray start --address`` on 127.0.0.1, each ``ray start
    --block`` in a process group of its own so that a test can kill one node whole."""

    def __init__(self, root: Path, cpus: tuple[int, int], env: dict[str, str] | None = None,
                 worker_env: dict[str, str] | None = None):
        self.root, self.cpus, self.port, self.extra = root, cpus, free_port(), env or {}
        self.worker_extra = worker_env or {}  # the first worker node's own
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, **RAY_ENV, **self.extra}

    def _start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        ray = str(Path(sys.executable).parent / "ray")
        log = open(self.root / f"{name}.log", "a")
        proc = subprocess.Popen([ray, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.root}", *args],
                                env=self.env() | (env or {}), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, workers: int = 1) -> None:
        self.head = self._start("head", "--head", f"--port={self.port}", f"--num-cpus={self.cpus[0]}",
                                "--include-dashboard=false")
        self._wait(1)
        for _ in range(workers):
            self.add_worker(self.worker_extra)

    def add_worker(self, env: dict[str, str] | None = None) -> None:
        """A worker node joins (again, after a test killed the first), ``env`` added to its environment."""
        self.worker = self._start("worker", f"--address={self.address}", f"--num-cpus={self.cpus[1]}", env=env)
        self._wait(2)

    def alive(self) -> list[dict]:
        out = subprocess.run([sys.executable, "-c", _NODES, self.address], env=self.env(), capture_output=True,
                             text=True, timeout=120)
        return [dict(zip(("id", "head"), line.split())) for line in out.stdout.split("\n") if line.strip()]

    def _wait(self, count: int) -> None:
        deadline = time.time() + 120
        while True:
            try:
                if len(self.alive()) >= count:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                logs = "".join((self.root / f"{n}.log").read_text()[-1500:] for n in ("head", "worker")
                               if (self.root / f"{n}.log").exists())
                raise RuntimeError(f"the Ray cluster did not start: {logs}")
            time.sleep(0.5)

    def kill(self, proc: subprocess.Popen) -> None:
        """Kill a node whole, as when its machine goes: its `ray start`, raylet and every worker
        process (Ray gives each worker a process group of its own, so the tree, not the group)."""
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(proc.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        proc.wait(timeout=30)
        self.procs.remove(proc)

    def stop(self) -> None:
        for proc in reversed(list(self.procs)):
            self.kill(proc)
        shutil.rmtree(self.root, ignore_errors=True)


_NODES = """
import sys, logging, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR)
for n in ray.nodes():
    if n["Alive"]:
        print(n["NodeID"], int("node:__internal_head__" in n["Resources"]))
"""


@contextlib.contextmanager
def ray_cluster(cpus: tuple[int, int] = (1, 1), env: dict[str, str] | None = None,
                workers: int = 1, worker_env: dict[str, str] | None = None) -> Iterator[RayNodes]:
    """A head and ``workers`` worker nodes (``env`` added to their processes' environment,
    and ``worker_env`` to the worker nodes');
    yields them; kills them all (never `ray stop`, which would stop every Ray process of this
    machine)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    nodes = RayNodes(root, cpus, env, worker_env)
    try:
        nodes.start(workers)
        yield nodes
    finally:
        nodes.stop()
