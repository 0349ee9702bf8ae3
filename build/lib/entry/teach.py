"""`mlflow run . -e teach`: train a teacher against a frozen student from the registry."""

from entry.options import command, run, stage_options, start
from ttkd import config


@command("teach")
@stage_options(config.STAGE_PARAMS["teach"])
def main(preset, **given):
    """Train teacher ARCH against the frozen STUDENT with CE + w·T²·KL(teacher ‖ student);
    register it (default name DATASET-ARCH-trained, -normal or -nasty by the sign of w)."""
    start("teach", given, preset)


if __name__ == "__main__":
    run(main)
