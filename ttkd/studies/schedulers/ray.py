"""The scheduler of many machines: a Ray cluster, each point a Ray task.

Ray is imported here only, and only when a sweep names a cluster. A cluster that runs jobs
for anyone who reaches its ports (Ray's token authentication off) is refused unless the user
says ``cluster_auth=none``; ``cluster=local`` starts a Ray instance of the sweep's own that
answers only a token it made. A point retried on another node fences the attempt it
replaces (``ttkd.tracking.attempts``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

from ttkd import config, signals, tracking
from ttkd import data as datasets
from ttkd.errors import TTKDError
from ttkd.studies.plan import Outcome, Task
from ttkd.studies.runner import latest_attempt, log_to_output, run_task

log = logging.getLogger(__name__)

VERSION = importlib.metadata.version("ttkd")  # every node must run the same
CONNECT_TIMEOUT_S = 25  # a cluster that does not answer within this is one line, not a hang
TAG_NODE, TAG_HOST = "ttkd.node", "ttkd.host"
# what a point's process needs from the sweep's environment to reach the same store, as the same user
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_EXPERIMENT_ID")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a point trains on a cluster: the resources its Ray task declares."""

    cluster: str              # local, auto, HOST:PORT or ray://HOST:PORT
    cpus_per_point: float = 1.0
    gpus_per_point: float = 0.0
    threads: int = 0          # torch threads per point (0: cpus_per_point, at least 1)
    auth: str = "token"       # token: refuse a cluster that runs jobs without Ray's token; none: accept it

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_point))


def import_ray():
    config.check_ray()
    import ray

    return ray


class RayCluster:
    """Each point a Ray task with ``placement``'s resources, queued at once: Ray starts it
    when a node has them free. A task whose node dies is run again elsewhere (Ray's
    retries) and continues its run from the checkpoint the tracking server holds."""

    MAX_RETRIES = 3  # times a point is run again after its node died

    def __init__(self, placement: Placement):
        self.placement = placement
        self._refs: dict = {}          # Ray object ref -> its point
        self._stop = 0
        self._cancelled = False

    @property
    def running(self) -> int:
        return len(self._refs)

    def __enter__(self) -> RayCluster:
        ray = import_ray()  # (the store was checked by the sweep, before it touched it)
        self._connect(ray)
        try:
            self._check_resources(ray)
        except TTKDError:
            ray.shutdown()
            self._restore_auth()
            raise
        options = dict(num_cpus=self.placement.cpus_per_point, num_gpus=self.placement.gpus_per_point,
                       max_retries=self.MAX_RETRIES, retry_exceptions=False)
        if self.placement.gpus_per_point:
            options["max_calls"] = 1  # a process sees the GPUs of its first task only: one task each
        self._remote = ray.remote(**options)(train_on_node)
        self._env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        ray = import_ray()
        if kind is not None:  # a second Ctrl-C, a lost driver: stop at once, resume continues them
            for ref in self._refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        ray.shutdown()
        self._restore_auth()
        return False

    def _restore_auth(self) -> None:
        if not hasattr(self, "_auth_env"):
            return
        for key, value in self._auth_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_auth()

    def free(self) -> bool:
        return True  # Ray queues the point until a node has its resources

    def submit(self, task: Task, verbose: bool) -> None:
        ref = self._remote.remote(task, self.placement.torch_threads, tracking.tracking_uri(), self._env,
                                  VERSION)
        self._refs[ref] = task.point

    def wait(self) -> list[Outcome]:
        ray = import_ray()
        while True:
            if self._stop and not self._cancelled:  # outside the signal handler: Ray calls are not reentrant
                self._cancelled = True
                for ref in self._refs:
                    ray.cancel(ref)  # a KeyboardInterrupt in the task's process: it stops after its step
            ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=0.25)
            if ready:
                break
        outcomes = []
        for ref in ready:
            point = self._refs.pop(ref)
            try:
                outcomes.append(ray.get(ref))
            except ray.exceptions.TaskCancelledError:
                continue  # cancelled before it started: the point was never trained
            except ray.exceptions.RayError as exc:  # its node died more often than Ray retries, ...
                outcomes.append(Outcome(point, error=f"lost on the cluster: {_first_line(exc)}"))
        return outcomes

    def stop(self, signum: int) -> None:
        self._stop = signum

    def _connect(self, ray) -> None:
        cluster = self.placement.cluster
        quiet = dict(log_to_driver=False, logging_level=logging.ERROR)  # the sweep prints a line per point
        if cluster == "local":  # a Ray instance of this sweep's own, answering only its token
            self._auth_env = {k: os.environ.get(k) for k in AUTH_ENV}
            os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_urlsafe(32)})
            _reload_auth()
            try:
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
            except BaseException:
                self._restore_auth()
                raise
            return
        address = _answering(cluster)
        if self.placement.auth != "none" and accepts_unauthenticated(cluster):
            raise TTKDError(f"the Ray cluster at {cluster} ({address}) runs jobs for anyone who reaches its ports, "
                            f"without Ray's token authentication; start every node with RAY_AUTH_MODE=token and "
                            f"one RAY_AUTH_TOKEN, and set both here (docs/how-to/cluster.md), or pass "
                            f"cluster_auth=none to use it as it is")
        failure: list[BaseException] = []

        def connect() -> None:
            try:
                ray.init(address=cluster, **quiet)
            except BaseException as exc:  # noqa: B036 (reported by the caller)
                failure.append(exc)
        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(CONNECT_TIMEOUT_S)
        if thread.is_alive() or failure:
            why = f"{_first_line(failure[0])}" if failure else f"no answer within {CONNECT_TIMEOUT_S} s"
            raise TTKDError(f"cannot join the Ray cluster at {cluster} ({address}: {why}); start it with "
                            f"`ray start --head`, or give the address `ray start` printed (cluster=HOST:PORT)")

    def _check_resources(self, ray) -> None:
        p = self.placement
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        have = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes]
        fits = [c >= p.cpus_per_point and g >= p.gpus_per_point for c, g in have]
        if not any(fits):
            shown = "; ".join(f"{c:g} CPU, {g:g} GPU" for c, g in have) or "none"
            raise TTKDError(f"no node of the cluster has cpus_per_point={p.cpus_per_point:g} and "
                            f"gpus_per_point={p.gpus_per_point:g} free for one point; its {len(have)} "
                            f"node{'s have' if len(have) != 1 else ' has'}: {shown}")


AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")  # Ray's token authentication, read when a process joins
_PROBE = """
import logging, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR)
ray.nodes()
print("joined")
"""


def _reload_auth() -> None:
    """Make this process's Ray see the authentication settings its environment has now: Ray
    reads them once and caches them (its own ``ray.init`` reloads them the same way)."""
    from ray._private.authentication.authentication_token_setup import AuthenticationTokenLoader
    from ray._raylet import Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def accepts_unauthenticated(cluster: str) -> bool:
    """Whether the Ray cluster at ``cluster`` lets a process join with no token: a process
    with Ray's authentication off (and no token in its environment) tries. A cluster that
    wants a token says so at once, where Ray's client would retry until it gives up."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["RAY_AUTH_MODE"] = "disabled"
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, cluster], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = threading.Timer(CONNECT_TIMEOUT_S, probe.kill)
    deadline.start()
    try:
        for line in probe.stdout:
            if line.strip() == "joined":
                return True
            if "Unauthenticated" in line or "InvalidAuthToken" in line:
                return False
        return False
    finally:
        deadline.cancel()
        probe.kill()
        probe.wait()


def _answering(cluster: str) -> str:
    """The GCS (or Ray client) address behind ``cluster``, once it accepts a connection."""
    from ray._private import services

    if cluster.startswith("ray://"):
        address = cluster[len("ray://"):]
    else:
        try:
            address = services.canonicalize_bootstrap_address(cluster)
        except Exception:  # noqa: BLE001 (no cluster file, a malformed address)
            address = None
        if address is None:
            raise TTKDError(f"cluster={cluster}: no Ray cluster found on this machine; start one with "
                            f"`ray start --head`, or give its address (cluster=HOST:PORT)")
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            return address
    except (OSError, ValueError) as exc:
        raise TTKDError(f"cannot join the Ray cluster at {cluster} ({address}: {_first_line(exc)}); start it "
                        f"with `ray start --head`, or give the address `ray start` printed") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


_kept: list = []  # a node's worker process keeps its data sets from point to point


def train_on_node(task: Task, threads: int, tracking_uri: str, env: dict, version: str) -> Outcome:
    """A point's Ray task, in a worker process of some node: the sweep's store and
    experiment, ``threads`` torch threads, the node's id and host name as tags; a run
    of this point that an earlier attempt left unfinished (its node died) is continued
    from its checkpoint instead of started again. Ray's attempt number for the task makes
    this attempt newer than the ones before it (``ttkd.tracking.attempts``): an earlier attempt
    still alive behind a partition writes nothing more once this one has begun."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    host = socket.gethostname()
    where = {TAG_NODE: node, TAG_HOST: host}
    if version != VERSION:
        return Outcome(task.point, error=f"node {host} ({node[:12]}) runs ttkd {VERSION} and the sweep "
                                         f"ttkd {version}; install the same ttkd on every node")
    data_dir = task.kwargs.get("data_dir")
    if data_dir and not Path(data_dir).exists():
        return Outcome(task.point, error=f"node {host} ({node[:12]}) has no data set at {data_dir}; put it at "
                                         f"that path on every node (or on a file system they share)")
    os.environ.update(env)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)
    tracking.set_tracking_uri(tracking_uri)
    torch.set_num_threads(threads)
    if not _kept:
        _kept.append(datasets.load_once().__enter__())
    # ray.cancel raises SIGINT's handler in this process: noted here, it stops the stage at its next step
    signals.stop_on_signals.pending = None
    before = signal.signal(signal.SIGINT, signals.note_signal)
    try:
        retry = ray._private.worker.global_worker.core_worker.get_current_task_attempt_number()
        task = dataclasses.replace(task, kwargs=task.kwargs | {"tags": task.kwargs.get("tags", {}) | where},
                                   attempt=(task.attempt or (1, 0))[0:1] + (retry,))
        earlier = latest_attempt(task)
        if isinstance(earlier, Outcome):
            return earlier
        outcome = run_task(dataclasses.replace(task, resume_run=earlier), extra_tags=where)
        if outcome.superseded:  # cut off from the cluster while Ray retried the point elsewhere
            with log_to_output():  # this worker's stderr, kept in the node's Ray logs
                log.warning(outcome.error)
        return outcome
    finally:
        signal.signal(signal.SIGINT, before)
        signals.stop_on_signals.pending = None
