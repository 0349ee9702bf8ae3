"""`mlflow run . -e teach`: train a teacher against a frozen student from the registry."""

from entry.options import command, run, stage_options
from ttkd import config, stages


@command("teach")
@stage_options(config.STAGE_PARAMS["teach"])
def main(preset, **given):
    """Train teacher ARCH against the frozen STUDENT with CE + w·T²·KL(teacher ‖ student);
    register it (default name DATASET-ARCH-trained, -normal or -nasty by the sign of w)."""
    cfg = config.resolve("teach", given, preset)
    if cfg.values["resume"]:
        stages.resume("teach", cfg.values["resume"])
        return
    if not cfg.values["student"]:
        raise config.TTKDError("missing student: the frozen student, as NAME, NAME@ALIAS, "
                               "NAME/VERSION, models:/... or runs:/... (-P student=...)")
    stages.teach(**cfg.stage_kwargs())


if __name__ == "__main__":
    run(main)
