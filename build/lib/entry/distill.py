"""`mlflow run . -e distill`: distil a student from a frozen teacher from the registry."""

from entry.options import command, run, stage_options, start
from ttkd import config


@command("distill")
@stage_options(config.STAGE_PARAMS["distill"])
def main(preset, **given):
    """Distil student ARCH from the frozen TEACHER with (1 − α)·CE + α·T²·KL(teacher ‖ student);
    register it (default name DATASET-ARCH-kd)."""
    start("distill", given, preset)


if __name__ == "__main__":
    run(main)
