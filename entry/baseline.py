"""`mlflow run . -e baseline`: train a network from scratch with cross-entropy."""

from entry.options import command, run, stage_options
from ttkd import config, stages


@command("baseline")
@stage_options(config.STAGE_PARAMS["baseline"])
def main(preset, **given):
    """Train ARCH from scratch with cross-entropy; register it (default name DATASET-ARCH)."""
    cfg = config.resolve("baseline", given, preset)
    if cfg.values["resume"]:
        stages.resume("baseline", cfg.values["resume"])
        return
    stages.baseline(**cfg.stage_kwargs())


if __name__ == "__main__":
    run(main)
