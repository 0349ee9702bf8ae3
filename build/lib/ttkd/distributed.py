"""Several processes training one model, on PyTorch's own distributed engine.

A stage with ``nproc > 1`` (or ``nnodes > 1``) runs as one process per device, started
by ``torch.distributed.run`` (torchrun). One process, the *leader*, does everything a
single process does: it reads the registry, talks to MLflow, prints and saves. The others,
the *followers*, only train: for each stage the leader sends them what they need to build
the same training (:func:`lead`), and they wait for the next stage in :func:`follow`.
Training itself is DistributedDataParallel (``ttkd.engine``): each process takes a
shard of every global batch and the gradients are averaged by all-reduce.

The leader is local rank 0 of the machine started with ``node_rank=0`` (ttkd's own
launcher says which that is); under a plain ``torchrun`` it is global rank 0.
This module knows nothing of MLflow and prints nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ttkd.errors import TTKDError

LEADS = "TTKD_LEADS"  # set by ttkd's launcher: "1" on the machine whose local rank 0 leads
TIMEOUT = datetime.timedelta(minutes=30)  # a training collective waiting longer than this fails
HANDOFF_TIMEOUT = datetime.timedelta(days=7)  # followers wait this long for the leader's next stage


class Lost(TTKDError):
    """Another process of the group stopped while this one trained beside it."""


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    leader: int  # the global rank of the leader

    @property
    def leads(self) -> bool:
        return self.rank == self.leader


_world: World | None = None
_handoff = None  # the gloo group the leader sends stages through: it may wait for days
_busy = False  # the leader has sent a stage that the followers are still training


def world() -> World | None:
    """The process group this process belongs to, or None when it trains alone."""
    return _world


def size() -> int:
    return _world.size if _world else 1


def init(cuda: bool) -> World:
    """Join the process group torchrun describes in the environment: NCCL for CUDA
    tensors (with gloo beside it for CPU ones), gloo on CPUs; find the leader."""
    global _world, _handoff
    if _world is not None:
        return _world
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    rank, size_ = dist.get_rank(), dist.get_world_size()
    flags = [None] * size_
    dist.all_gather_object(flags, os.environ.get(LEADS) == "1" and local_rank == 0)
    leaders = [r for r, f in enumerate(flags) if f]
    if len(leaders) > 1:
        raise TTKDError(f"{len(leaders)} machines were started with node_rank=0; give each other "
                        f"machine its own node_rank (1 to nnodes-1)")
    _handoff = dist.new_group(backend="gloo", timeout=HANDOFF_TIMEOUT)
    _world = World(rank, size_, local_rank, leaders[0] if leaders else 0)
    if not _world.leads:
        os.environ.pop("MLFLOW_RUN_ID", None)  # only the leader has a run
    return _world


def broadcast(obj: Any = None) -> Any:
    """The leader's ``obj`` on every process (pickled: for small objects and state dicts),
    through the hand-off group, where a follower may wait as long as the leader needs."""
    box = [obj]
    dist.broadcast_object_list(box, src=_world.leader, group=_handoff)
    return box[0]


def lead(message: Any) -> None:
    """Leader: send the followers one stage to train (or None: nothing more)."""
    global _busy
    try:
        broadcast(message)
    except RuntimeError as exc:
        raise Lost(f"the other processes are gone ({_last_line(exc)})") from None
    _busy = message is not None


def busy() -> bool:
    """Leader: whether the followers are inside a stage that has not ended for them."""
    return _busy


def done() -> None:
    """Leader: the stage sent by :func:`lead` ended on every process (finished, or
    stopped on all of them at once by a signal or a NaN)."""
    global _busy
    _busy = False


def release() -> None:
    """Leader: tell the followers there is nothing more to train, unless they are still
    inside a stage that failed on the leader alone; they then stop when the leader's
    process ends (their next collective operation fails at once)."""
    if _world is not None and _world.leads and not _busy:
        lead(None)


def follow(train: Callable[[Any], None], expected: tuple[type[Exception], ...] = ()) -> None:
    """Follower: train each stage the leader sends with ``train(message)`` until it sends
    None. An ``expected`` exception (a stop all processes agreed on) ends the stage but
    not the loop; any other one ends this process."""
    while (message := broadcast()) is not None:
        try:
            train(message)
        except expected:
            pass


def agree(signum: int, bad_step: int) -> tuple[int, int]:
    """Every process's stop request (the signal it received, 0 if none) and first step
    with a NaN loss (-1 if none), combined: the highest signal any process received and
    the first bad step of any. All processes call it at the same step and so take the
    same decision."""
    if _world is None:
        return signum, bad_step
    flags = torch.tensor([-signum, bad_step if bad_step >= 0 else 2**62], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    first = int(flags[1])
    return -int(flags[0]), first if first < 2**62 else -1


def total(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process (in place); ``t`` alone when training alone."""
    if _world is not None:
        dist.all_reduce(t)
    return t


def share_buffers(module: torch.nn.Module) -> None:
    """Copy the leader's buffers (BatchNorm statistics) to every process, so that every
    process evaluates, and the leader saves, the same network."""
    if _world is None:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=_world.leader)


def shard(n: int) -> slice:
    """This process's contiguous part of ``n`` items; the parts' sizes differ by one at most."""
    if _world is None:
        return slice(0, n)
    return slice(_world.rank * n // _world.size, (_world.rank + 1) * n // _world.size)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where a stage's processes run: ``nproc`` on this machine, on each of ``nnodes``
    machines that meet at ``rdzv_endpoint`` (HOST:PORT); ``node_rank`` 0 leads."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    rdzv_timeout: int = 300  # seconds: for every machine to join, and for the endpoint to answer

    @property
    def processes(self) -> int:
        return self.nproc * self.nnodes

    def check(self, device_type: str) -> list[str]:
        """Refuse what cannot run; return warnings for what runs slowly."""
        if self.node_rank >= self.nnodes:
            raise TTKDError(f"node_rank {self.node_rank} is not below nnodes {self.nnodes}; number the "
                            f"machines 0 to {self.nnodes - 1}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise TTKDError("nnodes > 1 needs rdzv_endpoint=HOST:PORT, an address of the node_rank=0 "
                            "machine that every machine can reach (for example 10.0.0.1:29400)")
        if device_type == "cuda" and self.nproc > torch.cuda.device_count():
            raise TTKDError(f"nproc {self.nproc} is more than the {torch.cuda.device_count()} GPUs this "
                            f"machine has; use nproc={torch.cuda.device_count()} (one process per GPU)")
        cores = os.cpu_count() or 1
        if device_type == "cpu" and self.nproc > cores:
            return [f"nproc {self.nproc} is more than this machine's {cores} CPU cores: the processes "
                    f"will take turns on them"]
        return []


def relaunch(module: str, argv: list[str], launch: Launch) -> int:
    """Run ``python -m module *argv`` as ``launch.nproc`` processes on this machine with
    ``torch.distributed.run`` (c10d rendezvous, no restarts: a stage resumes from its
    checkpoint instead). Returns the exit status of the first process that failed (0
    when all finished): that process has said why. A process killed by a signal, a
    rendezvous that fails and a signal to this launcher (passed on to the processes) raise
    or return as the one line they deserve."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    args = [f"--nproc-per-node={launch.nproc}", f"--nnodes={launch.nnodes}", "--max-restarts=0"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        args.append("--standalone")
    else:
        t = launch.rdzv_timeout
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}", "--rdzv-id=ttkd",
                 f"--rdzv-conf=join_timeout={t},read_timeout={t}"]
    os.environ[LEADS] = "1" if launch.node_rank == 0 else "0"
    # torchrun would set one thread per process; share this machine's threads instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // launch.nproc)))
    if not os.environ.get("TTKD_DEBUG"):  # its log lines repeat what the processes say in one
        for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
            if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.main([*args, "-m", module, *argv])
    except ChildFailedError as exc:
        # a process killed by a signal is the cause, even when the others' failures (lost
        # contact with it) were seen in the same poll; torchrun stops the others with SIGTERM
        # and their timestamps are whole seconds, so a SIGTERM death is the cause only when
        # no process died of another signal
        killed = sorted((f.exitcode == -signal.SIGTERM, f.timestamp, rank)
                        for rank, f in exc.failures.items() if f.exitcode < 0)
        rank = killed[0][2] if killed else exc.get_first_failure()[0]
        failure = exc.failures[rank]
        if failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name
            raise Lost(f"process {rank} of {launch.processes} (pid {failure.pid}) was killed by {name}; "
                       f"the others were stopped") from None
        return failure.exitcode
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except (RendezvousError, dist.DistError) as exc:
        where = launch.rdzv_endpoint or "this machine"
        raise TTKDError(f"the processes could not meet at {where} within {launch.rdzv_timeout} s "
                        f"({_last_line(exc)}); start the node_rank=0 machine, check HOST:PORT and "
                        f"that every machine can reach it, or raise rdzv_timeout") from None
    return 0


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:160] if text else type(exc).__name__
