"""`mlflow run . -e promote`: point an alias at the best (or a chosen) model version."""

import click

from entry.options import command, run
from ttkd import registry


@command("promote")
@click.option("--model", required=True,
              help="NAME (its best version by METRIC) or NAME/VERSION, NAME@ALIAS (that version).")
@click.option("--metric", default="val_acc", show_default=True,
              help="Run metric to judge by; names with loss/error/time are minimised.")
@click.option("--alias", default=registry.DEFAULT_ALIAS, show_default=True)
@click.option("--force", type=click.BOOL, default=False, show_default=True,
              help="Move the alias even to a worse version.")
@click.option("--by", type=click.Choice(["self", "students"]), default="self", show_default=True,
              help="self: each version's own METRIC; students (teachers only): the mean METRIC "
                   "of the students distilled from each version.")
@click.option("--student_arch", default="", help="by=students: count only students of this architecture.")
@click.option("--method", default="", help="by=students: count only students of this KD method.")
def main(model, metric, alias, force, by, student_arch, method):
    """Point ALIAS at a version of MODEL and print what changed."""
    print(registry.promote(model, metric=metric, alias=alias, force=force, by=by,
                           student_arch=student_arch, method=method))


if __name__ == "__main__":
    run(main)
