"""Fenced attempts: of two tries at one run (or one sweep point), only the newer writes,
and a point registers its model once, whatever order the tries reach the store in."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ttkd import tracking
from ttkd.tracking import attempts, registry
from ttkd.tracking.registry import ModelRef


def new_run(parent: str | None = None) -> str:
    client = MlflowClient()
    tags = {"mlflow.parentRunId": parent} if parent else {}
    return client.create_run("0", tags=tags).info.run_id


def test_a_resumed_run_fences_the_attempt_before_it(store):
    run = new_run()
    first = attempts.begin(run)
    assert first.token == (1, 0) and first.current()
    second = attempts.begin(run)  # a resume: the next generation
    assert second.token == (2, 0) and second.current() and not first.current()
    with pytest.raises(attempts.Superseded, match=f"attempt 1.0 at run {run} was superseded by attempt 2.0 "
                                                  r"\(the same run\), a retry elsewhere; it writes nothing more"):
        first.check()
    second.check()


def test_the_larger_token_wins_whatever_order_the_attempts_arrive_in(store):
    run = new_run()
    retry = attempts.begin(run, token=(1, 1))  # Ray's retry reached the store first
    with pytest.raises(attempts.Superseded, match="attempt 1.0 .* superseded by attempt 1.1"):
        attempts.begin(run, token=(1, 0))      # the first try, thawed after a partition
    assert retry.current()
    with pytest.raises(attempts.TTKDError, match="attempt 1.1 at run .* is claimed by another process already"):
        attempts.begin(run, token=(1, 1))      # two processes with one token: the second is refused


def test_a_point_is_fenced_across_its_runs_and_a_stale_fresh_run_is_deleted(store):
    client = MlflowClient()
    parent = new_run()
    point = "kd seed=0 w=0.005 method=kd"
    first = attempts.begin(new_run(parent), parent_id=parent, point=point, token=(1, 0))
    second_run = new_run(parent)  # the retry started the point again in a new run
    second = attempts.begin(second_run, parent_id=parent, point=point, token=(1, 1), fresh=True)
    with pytest.raises(attempts.Superseded, match=f"of point '{point}' was superseded by attempt 1.1 "
                                                  f"\\(run {second_run}\\)"):
        first.check()
    other = attempts.begin(new_run(parent), parent_id=parent, point="student seed=0", token=(1, 0))
    assert other.current() and second.current()  # another point's claims are its own
    stale = new_run(parent)  # the first try, frozen before it opened its run, thaws
    with pytest.raises(attempts.Superseded):
        attempts.begin(stale, parent_id=parent, point=point, token=(0, 3), fresh=True)
    assert client.get_run(stale).info.lifecycle_stage == "deleted"
    assert attempts.point_run(parent, point) == second_run
    assert attempts.next_generation(parent) == 2 and attempts.next_generation(parent) == 3


def test_a_point_registers_once_and_a_later_attempt_adopts_the_version(store, monkeypatch):
    client = MlflowClient()
    made = []

    def register(model_uri, name, tags):  # a version of the attempt's run, as the real one makes
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        mv = client.create_model_version(name, f"runs:/{model_uri}/model", run_id=model_uri)
        made.append(str(mv.version))
        return ModelRef(f"models:/{name}/{mv.version}", name, str(mv.version), model_uri)

    monkeypatch.setattr(registry, "register", register)
    parent = new_run()
    point = "teacher seed=1 w=0"
    run = new_run(parent)
    first = attempts.begin(run, parent_id=parent, point=point, token=(1, 0))
    ref = attempts.register_once(first, run, "pt", {})
    retry = attempts.begin(run, parent_id=parent, point=point, token=(1, 1))  # died before tagging its run
    assert attempts.register_once(retry, run, "pt", {}) == ref and made == ["1"]
    with pytest.raises(attempts.Superseded):
        attempts.register_once(first, run, "pt", {})
    # a point whose claimant registered nothing: refused, naming what to do; deleted, it is void
    blocked_run = new_run(parent)
    blocked = attempts.begin(blocked_run, parent_id=parent, point="kd seed=1", token=(1, 0))
    client.log_param(parent, attempts.REGISTRATION + f".p{attempts._digest('kd seed=1')}", f"{blocked_run} 0.9")
    with pytest.raises(attempts.TTKDError, match=f"claimed for registration by attempt 0.9 of run {blocked_run}, "
                                                 "which has registered nothing; if it is dead, start the stage"):
        attempts.register_once(blocked, blocked_run, "pk", {})
    fresh = new_run(parent)
    claimed = attempts.begin(fresh, parent_id=parent, point="kd seed=1", token=(2, 0))
    client.log_param(parent, attempts.REGISTRATION + f".p{attempts._digest('kd seed=1')}.2", f"{blocked_run} 1.0")
    client.delete_run(blocked_run)
    assert attempts.register_once(claimed, fresh, "pk", {}).run_id == fresh and made == ["1", "1"]


def test_a_superseded_stage_writes_nothing_more_and_leaves_the_run_to_the_newer_attempt(store, cli, monkeypatch):
    """A newer attempt claims the run after epoch 1: the stage stops before epoch 2's
    checkpoint, writes no metric, model, registration or status, and says why in one line."""
    log_epoch = tracking.log_epoch

    def then_a_retry(s, partner_acc, split):
        log_epoch(s, partner_acc, split)
        if s.epoch == 1:
            attempts.begin(mlflow.active_run().info.run_id)

    monkeypatch.setattr(tracking, "log_epoch", then_a_retry)
    status, _, err = cli("baseline", "--epochs", "3", "--amp", "false", "--compile", "false", "--register_as", "fenced")
    assert status == 1
    assert err.strip().splitlines()[-1].endswith("was superseded by attempt 2.0 (the same run), a retry elsewhere; "
                                                 "it writes nothing more")
    run = mlflow.search_runs(output_format="list")[0]
    client = MlflowClient()
    assert run.info.status == "RUNNING"  # the newer attempt's to end
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]
    assert len(tracking.checkpoint_digests(run.info.run_id)["last.pt"]) == 1  # epoch 1's only
    assert client.search_registered_models("name = 'fenced'") == [] and "best_val_acc" not in run.data.metrics
    assert mlflow.active_run() is None
