"""`mlflow run . -e baseline`: train a network from scratch with cross-entropy."""

from entry.options import command, run, stage_options, start
from ttkd import config


@command("baseline")
@stage_options(config.STAGE_PARAMS["baseline"])
def main(preset, **given):
    """Train ARCH from scratch with cross-entropy; register it (default name DATASET-ARCH)."""
    start("baseline", given, preset)


if __name__ == "__main__":
    run(main)
