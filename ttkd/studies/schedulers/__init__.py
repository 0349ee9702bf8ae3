"""Where a grid's points train: one interface, two backends.

:class:`~ttkd.studies.schedulers.local.LocalPool` trains ``jobs`` points at once on this
machine, in this process (``jobs=1``) or in worker processes.
:class:`~ttkd.studies.schedulers.ray.RayCluster` hands each point to Ray as a task that
declares ``cpus_per_point`` and ``gpus_per_point`` (fractions pack several points on one
GPU): Ray places it on a node with those resources free, sets ``CUDA_VISIBLE_DEVICES`` for
it, and runs it again elsewhere when its node dies. A point run again continues its run from
the last checkpoint in the tracking server, so a lost node costs at most an epoch.

Both take a point's :class:`~ttkd.studies.plan.Task`, execute it with
``ttkd.studies.runner.run_task`` and give back its :class:`~ttkd.studies.plan.Outcome`; the
runner decides what runs when. Ray is an optional extra (``pip install -e '.[cluster]'``),
imported only in ``ray.py`` and only for ``cluster=``.
"""

from __future__ import annotations

from typing import Protocol

from ttkd.studies.plan import Outcome, Task


class Scheduler(Protocol):
    """Trains the points the grid hands it and reports each one's outcome."""

    running: int  # points handed over and not yet reported

    def free(self) -> bool:
        """Whether another point can be handed over now."""

    def submit(self, task: Task, verbose: bool) -> None:
        """Start training ``task``'s point (now, or as soon as resources are free)."""

    def wait(self) -> list[Outcome]:
        """Block until at least one point has finished; their outcomes."""

    def stop(self, signum: int) -> None:
        """Ask every running point to stop after its current step (called from a signal handler)."""
