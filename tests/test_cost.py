"""What a model costs: counts that can be checked by hand, timings that are only positive."""

import types

from torch import nn

from ttkd import cost


def test_macs_are_the_flop_counters_halved_and_match_the_layers_by_hand():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    by_hand = 4 * 1 * 3 * 3 * 8 * 8 + 4 * 8 * 8 * 10  # conv: out channels x in x kernel x positions; linear: in x out
    assert cost.macs(net, (1, 8, 8)) == by_hand
    assert cost.parameters(net) == (4 * 9 + 4) + (256 * 10 + 10)


def test_measure_counts_the_network_and_times_the_served_function_at_batch_1_and_256():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    batches = []

    def served(x):  # the served network: a function of a float32 numpy batch
        batches.append(x.shape)
        return x.reshape(len(x), -1)[:, :10]
    c = cost.measure(net, served, (1, 8, 8), model_bytes=123, threads=1)
    assert set(batches) == {(1, 1, 8, 8), (cost.THROUGHPUT_BATCH, 1, 8, 8)}
    assert batches.count((1, 1, 8, 8)) == cost.WARMUP_CALLS + cost.LATENCY_CALLS
    assert batches.count((cost.THROUGHPUT_BATCH, 1, 8, 8)) == 1 + cost.THROUGHPUT_CALLS
    assert (c.params, c.macs, c.model_bytes, c.threads) == (650, 640, 123, 1)
    assert c.latency_ms_b1_cpu > 0 and c.throughput_b256_cpu > 0 and c.latency_ms_b1_cuda is None
    assert set(c.metrics()) == {"params", "macs", "model_bytes", "latency_ms_b1_cpu", "throughput_b256_cpu",
                                "cost_threads"}


def test_timing_stops_once_the_timed_calls_have_taken_their_time(monkeypatch):
    clock = iter(range(0, 1000))  # every call of perf_counter one second later: each timed call takes 1 s
    monkeypatch.setattr(cost, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    assert cost.median_seconds(lambda: calls.append(1), 30, warmup=2) == 1
    assert len(calls) == 2 + cost.TIMED_S  # two untimed, then timed calls until TIMED_S seconds


def test_promote_under_a_latency_or_size_budget(store, cli):
    import mlflow
    from mlflow import MlflowClient

    for arch in ("cnn", "mlp"):  # the cnn is the more accurate and the slower
        assert cli("baseline", "--arch", arch, "--epochs", "1", "--register_as", "bud")[0] == 0
    client = MlflowClient()
    cnn, mlp = (client.get_model_version("bud", v) for v in ("1", "2"))
    acc = {str(v.version): mlflow.get_run(v.run_id).data.metrics["val_acc"] for v in (cnn, mlp)}
    assert acc["1"] > acc["2"]
    slow, fast = (float(v.tags["ttkd.latency_ms_b1_cpu"]) for v in (cnn, mlp))
    assert fast < slow
    status, out, err = cli("promote", "--model", "bud", "--max_latency_ms", str((slow + fast) / 2))
    assert status == 0 and "bud@champion: (unset) -> version 2" in out, err  # the best within the budget
    status, out, err = cli("promote", "--model", "bud", "--max_params", cnn.tags["ttkd.params"], "--force", "true")
    assert status == 0 and "-> version 1" in out, err

    # none within the budget, a bad budget: one line, the alias where it was
    status, _, err = cli("promote", "--model", "bud", "--max_latency_ms", str(fast / 10))
    assert status == 1 and err.count("\n") == 1
    assert (f"no version of bud is within max_latency_ms={fast / 10:g}; the fastest is bud version 2 at "
            f"{fast:.4g} ms per image at batch 1 on the CPU") in err
    for bad in ("0", "-1", "x", "nan"):
        status, _, err = cli("promote", "--model", "bud", "--max_latency_ms", bad)
        assert status == 1 and f"invalid max_latency_ms: '{bad}'; give a number > 0" in err
    assert str(client.get_model_version_by_alias("bud", "champion").version) == "1"

    # a version registered before costs were measured: named, and measured on request
    for key in [k for k in mlp.tags if k.startswith("ttkd.") and k[5:] in (
            "params", "macs", "model_bytes", "threads", "latency_ms_b1_cpu", "throughput_b256_cpu")]:
        client.delete_model_version_tag("bud", "2", key)
    status, _, err = cli("promote", "--model", "bud", "--max_latency_ms", str((slow + fast) / 2))
    assert status == 1 and ("bud: version 2 of bud has no measured cost (registered before ttkd measured it); "
                            "measure them with `mlflow run . -e promote -P model=bud -P measure=true`") in err
    status, out, err = cli("promote", "--model", "bud", "--max_latency_ms", str((slow + fast) / 2),
                           "--measure", "true", "--force", "true")
    assert status == 0 and "measured bud version 2:" in out and "-> version 2" in out, err
    assert client.get_model_version("bud", "2").tags["ttkd.params"] == mlp.tags["ttkd.params"]


def test_a_teacher_promoted_by_students_within_a_budget_is_judged_by_those_only(store, cli):
    from mlflow import MlflowClient

    assert cli("baseline", "--epochs", "1", "--register_as", "bs")[0] == 0
    for seed in ("0", "1"):
        assert cli("teach", "--student", "bs", "--epochs", "1", "--seed", seed, "--register_as", "bt")[0] == 0
    # teacher 1 taught a slow (cnn) student, teacher 2 a fast (mlp) one
    for version, arch in (("1", "cnn"), ("2", "mlp")):
        assert cli("distill", "--teacher", f"bt/{version}", "--arch", arch, "--epochs", "1",
                   "--register_as", "bk")[0] == 0
    client = MlflowClient()
    slow, fast = (float(client.get_model_version("bk", v).tags["ttkd.latency_ms_b1_cpu"]) for v in ("1", "2"))
    assert fast < slow
    status, out, err = cli("promote", "--model", "bt", "--by", "students", "--max_latency_ms", str((slow + fast) / 2))
    assert status == 0, err
    assert "version 1: no student within the budget, left out" in out and "-> version 2" in out
    status, _, err = cli("promote", "--model", "bt", "--by", "students", "--max_latency_ms", str(fast / 10))
    assert status == 1 and "no version of the students of bt is within" in err and "the fastest is bk version 2" in err
