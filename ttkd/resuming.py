"""Continuing an unfinished stage run from its last checkpoint, in the same MLflow run.

What the run trains is read back from the run's own record in the tracking store (the
``ttkd.stage_args`` tag, which holds the chosen step too), never from what its checkpoint
file says; the checkpoint gives only the weights and the engine state to go on from.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from collections.abc import Sequence

from ttkd import tracking
from ttkd.callbacks import Callback
from ttkd.config import TrainConfig
from ttkd.errors import TTKDError
from ttkd.presets import RunConfig, check_resume
from ttkd.stages import TAG_STAGE, StageResult, run_stage
from ttkd.step import Step
from ttkd.tracking import attempts, registry

log = logging.getLogger(__name__)

TAG_UNRESUMABLE = "ttkd.unresumable"  # why resume=last passes a run by (its checkpoint is damaged)


class NoCheckpoint(TTKDError):
    """A run to resume stopped before its first checkpoint."""


def resume(stage: str, reference: str, cfg: RunConfig | None = None,
           tags: dict[str, str] | None = None, attempt: attempts.Token | None = None,
           callbacks: Sequence[Callback] = ()) -> StageResult:
    """Continue an unfinished ``stage`` run (its id, or ``last`` for the newest one) from
    its last checkpoint, in the same MLflow run; the values ``cfg`` was given must be the
    run's own. ``tags`` (where it trains now) are added to the run's and its version's;
    ``attempt``, ``callbacks``: as in :func:`run_stage`."""
    registry.prepare_store()
    run = unfinished_run(stage, reference)
    run_id = run.info.run_id
    if cfg is not None:
        check_resume(cfg, run_id, run.data.params)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ckpt = tracking.download_checkpoint(run_id, tmp)
        except tracking.DamagedCheckpoint as exc:  # never again the newest run to resume
            tracking.tag_run(run_id, {TAG_UNRESUMABLE: "damaged checkpoint"})
            raise tracking.DamagedCheckpoint(f"{exc}; resume=last skips this run from now on") from None
    if ckpt is None:
        raise NoCheckpoint(f"run {run_id} has no checkpoint (it stopped in its first epoch); "
                           f"start the stage again without resume")
    if ckpt.get("format") != tracking.CHECKPOINT_FORMAT or ckpt.get("stage") != stage:
        raise TTKDError(f"the checkpoint of run {run_id} cannot be resumed (made by another version "
                        f"of ttkd or another stage); start the stage again")
    if os.environ.get("MLFLOW_RUN_ID") and tracking.active_run_id() is None:
        # started by `mlflow run`: point its run at the real one
        tracking.tag_run(os.environ["MLFLOW_RUN_ID"], {"ttkd.resumes_run": run_id})
    try:  # the run's own record, in the tracking store: never what its checkpoint file says
        kw = json.loads(run.data.tags[tracking.TAG_STAGE_ARGS])
    except (KeyError, ValueError):
        raise TTKDError(f"run {run_id} has no record of its stage's arguments (started by an older ttkd); "
                        f"start the stage again") from None
    return run_stage(stage, arch=kw["arch"], train=TrainConfig.from_dict(kw["train"]), partner=kw["partner"],
                     method=kw["method"], method_params=kw["method_params"], dataset=kw["dataset"],
                     data_dir=kw["data_dir"], stream=kw["stream"], register_as=kw["register_as"],
                     tags=(kw.get("tags") or {}) | (tags or {}), resume_from=(run_id, ckpt),
                     step=Step(**kw["step"]) if "step" in kw else None,  # older records: train has it
                     partner_data=kw.get("partner_data", "same"), trust_unverified=kw.get("trust_unverified", False),
                     attempt=attempt, holdout=kw.get("holdout", 0.0), callbacks=callbacks)


def unfinished_run(stage: str, reference: str):
    """The unfinished ``stage`` run named by ``reference`` (a run id, or ``last``)."""
    if reference == "last":  # in this experiment only: on a shared server, others' runs are elsewhere
        experiment, runs = tracking.newest_runs(TAG_STAGE, stage)
        runs = [r for r in runs if r.info.status != "FINISHED" and TAG_UNRESUMABLE not in r.data.tags]
        if not runs:
            raise TTKDError(f"no unfinished {stage} run to resume in experiment {experiment!r}; "
                            f"start one without resume, or give the experiment it ran in (experiment=NAME)")
        started = datetime.datetime.fromtimestamp(runs[0].info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        log.info(f"resume=last: run {runs[0].info.run_id} ({runs[0].info.run_name}, {runs[0].info.status}, "
                 f"started {started}) in experiment {experiment!r}")
        return runs[0]
    run = tracking.get_run(reference)
    if run is None:
        raise TTKDError(f"no run with id {reference!r}; give a run id from mlflow ui, or last")
    if run.data.tags.get(TAG_STAGE) != stage:
        raise TTKDError(f"run {run.info.run_id} is a {run.data.tags.get(TAG_STAGE, 'non-ttkd')} run; "
                        f"resume it with its own entry point")
    if run.info.status == "FINISHED":
        raise TTKDError(f"run {run.info.run_id} has finished; there is nothing to resume")
    return run
