import mlflow
import pytest
from mlflow import MlflowClient

from ttkd import data, models
from ttkd.errors import TTKDError
from ttkd.tracking import modelstore, promotion, registry

DIGITS = data.load("digits")


def make_version(name, val_acc, metric="val_acc"):
    """Log a small untrained model from a run with ``metric`` and register it; -> (run id, ModelRef)."""
    with mlflow.start_run() as run:
        mlflow.log_metric(metric, val_acc)
        info, _ = modelstore.log_model(models.build("mlp", 10, 1, image_size=8), DIGITS, "mlp")
    return run.info.run_id, registry.register(info.model_uri, name, {"ttkd.stage": "baseline"}), info


def aliases(name):
    return MlflowClient().get_registered_model(name).aliases


def test_every_reference_form(store):
    run1, v1, info1 = make_version("m", 90.0)
    run2, v2, _ = make_version("m", 95.0)
    assert (v1.version, v2.version) == ("1", "2")
    assert registry.resolve("m").uri == "models:/m/2"  # newest when no champion
    MlflowClient().set_registered_model_alias("m", "champion", "1")
    assert registry.resolve("m").uri == "models:/m/1"  # champion wins
    MlflowClient().set_registered_model_alias("m", "best", "2")
    assert registry.resolve("m@best").uri == "models:/m/2"
    assert registry.resolve("m/1").run_id == run1
    assert registry.resolve("models:/m/2").uri == "models:/m/2"
    assert registry.resolve("models:/m@champion").version == "1"
    assert registry.resolve(info1.model_uri).uri == info1.model_uri  # models:/m-<id>
    assert registry.resolve(f"runs:/{run2}/model").run_id == run2


@pytest.mark.parametrize("reference, message", [
    ("nope", r"no registered model named 'nope'; registered models: m"),
    ("m@gold", r"model 'm' has no alias 'gold'; its aliases are: \(none\)"),
    ("m/9", r"model 'm' has no version '9'; its versions are: 1"),
    ("runs:/0123456789abcdef/model", r"cannot find a model at runs:/0123456789abcdef/model"),
    ("", r"empty model reference"),
])
def test_bad_references_say_what_exists(store, reference, message):
    make_version("m", 90.0)
    with pytest.raises(TTKDError, match=message):
        registry.resolve(reference)


def test_promote_picks_the_best_version_then_stays(store):
    make_version("m", 90.0)
    make_version("m", 97.0)
    make_version("m", 93.0)
    first = promotion.promote("m")
    assert first.moved and first.old is None and first.new == "2"
    assert aliases("m") == {"champion": 2}
    again = promotion.promote("m")
    assert not again.moved and "unchanged" in str(again)


def test_promote_refuses_a_worse_version_unless_forced(store):
    make_version("m", 97.0)
    make_version("m", 90.0)
    promotion.promote("m")
    with pytest.raises(TTKDError, match=r"refusing to move m@champion from version 1 .*97.* to the worse version 2 .*force=true"):
        promotion.promote("m/2")
    assert aliases("m") == {"champion": 1}
    forced = promotion.promote("m/2", force=True)
    assert forced.moved and str(forced) == "m@champion: version 1 (val_acc 97) -> version 2 (val_acc 90)"
    assert aliases("m") == {"champion": 2}


def test_promote_minimises_losses(store):
    make_version("m", 0.5, metric="val_loss")
    make_version("m", 0.2, metric="val_loss")
    assert promotion.promote("m", metric="val_loss", alias="lowest").new == "2"


@pytest.mark.parametrize("call, message", [
    (lambda: promotion.promote("m", metric="f1"), "no version of 'm' has a metric 'f1'"),
    (lambda: promotion.promote("m", alias="v3"), "invalid alias 'v3'"),
    (lambda: promotion.promote("zzz"), "no registered model named 'zzz'"),
])
def test_promote_bad_input_leaves_aliases_alone(store, call, message):
    make_version("m", 90.0)
    with pytest.raises(TTKDError, match=message):
        call()
    assert aliases("m") == {}


def test_register_is_all_or_nothing(store, monkeypatch):
    _, _, info = make_version("m", 90.0)
    monkeypatch.setattr(MlflowClient, "get_model_version",
                        lambda self, name, version: type("V", (), {"tags": {}})())
    with pytest.raises(RuntimeError, match="were not stored"):
        registry.register(info.model_uri, "m", {"ttkd.stage": "baseline"})
    monkeypatch.undo()
    assert [v.version for v in MlflowClient().search_model_versions("name = 'm'")] == [1]


@pytest.mark.parametrize("name", ["a/b", "a@b", "models:x", ""])
def test_model_names_that_references_cannot_address_are_refused(name):
    with pytest.raises(TTKDError, match="invalid model name"):
        registry.check_model_name(name)
