"""`mlflow run . -e distill`: distil a student from a frozen teacher from the registry."""

from entry.options import command, run, stage_options
from ttkd import config, stages


@command("distill")
@stage_options(config.STAGE_PARAMS["distill"])
def main(preset, **given):
    """Distil student ARCH from the frozen TEACHER with (1 − α)·CE + α·T²·KL(teacher ‖ student);
    register it (default name DATASET-ARCH-kd)."""
    cfg = config.resolve("distill", given, preset)
    if cfg.values["resume"]:
        stages.resume("distill", cfg.values["resume"])
        return
    if not cfg.values["teacher"]:
        raise config.TTKDError("missing teacher: the frozen teacher, as NAME, NAME@ALIAS, "
                               "NAME/VERSION, models:/... or runs:/... (-P teacher=...)")
    stages.distill(**cfg.stage_kwargs())


if __name__ == "__main__":
    run(main)
