"""`mlflow run . -e predict`: classify a folder of image files with a model; the answers go to
the run as predictions.csv."""

import csv
import io
import sys

import click

from entry.options import command, run
from ttkd import tracking
from ttkd.errors import TTKDError
from ttkd.predict import classify_folder
from ttkd.stages import TAG_STAGE
from ttkd.tracking import modelstore, registry


@command("predict")
@click.option("--model", required=True, help="the model: NAME, NAME@ALIAS, NAME/VERSION, models:/... or runs:/...")
@click.option("--images", required=True, help="folder of image files (any size: resized to the model's)")
@click.option("--batch_size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--experiment", default=None, help="MLflow experiment of the run (default as the stages')")
@click.option("--trust_unverified", type=click.BOOL, default=False, show_default=True,
              help="use a model whose files the registry holds no SHA-256 record of, as it is (tagged on the run)")
def main(model, images, batch_size, experiment, trust_unverified):
    """Classify every image file under IMAGES; writes predictions.csv (file, class, name,
    probability) and, for files that are not readable images, skipped.csv."""
    if experiment is not None and not experiment.strip():
        raise TTKDError("invalid experiment: ''; give an experiment name, or leave experiment out for the default")
    tracking.use_experiment(experiment or "")
    ref = registry.resolve(model)
    result = classify_folder(ref, images, batch_size, trust_unverified)  # everything is read before the run opens
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr, flush=True)
    with tracking.start_run(name=f"predict {ref.name or ref.uri}"):  # ends FAILED if anything below fails
        tracking.set_tags({TAG_STAGE: "predict"} | ({modelstore.TAG_TRUSTED: ref.uri} if result.warning else {}))
        tracking.log_params({"model": ref.uri, "images": images, "predicted": len(result.rows),
                             "skipped": len(result.skipped)})
        tracking.log_text(_csv(result.rows, ("file", "class", "name", "probability")), "predictions.csv")
        if result.skipped:
            tracking.log_text(_csv([{"file": f, "reason": r} for f, r in result.skipped], ("file", "reason")),
                            "skipped.csv")
        uri = tracking.artifact_uri("predictions.csv")
    print(f"{len(result.rows)} images classified with {ref.uri}"
          + (f" ({result.resized} resized to the model's size)" if result.resized else "") + f": {uri}")
    for file, why in result.skipped:
        print(f"skipped {file}: {why}")


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


if __name__ == "__main__":
    run(main)
