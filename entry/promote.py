"""`mlflow run . -e promote`: point an alias at the best (or a chosen) model version."""

import math
import sys

import click

from entry.options import command, run
from ttkd import predict
from ttkd.errors import TTKDError
from ttkd.tracking import promotion


@command("promote")
@click.option("--model", required=True,
              help="NAME (its best version by METRIC) or NAME/VERSION, NAME@ALIAS (that version).")
@click.option("--metric", default="val_acc", show_default=True,
              help="Run metric to judge by; names with loss/error/time are minimised.")
@click.option("--alias", default=promotion.DEFAULT_ALIAS, show_default=True)
@click.option("--force", type=click.BOOL, default=False, show_default=True,
              help="Move the alias even to a worse version.")
@click.option("--by", type=click.Choice(["self", "students"]), default="self", show_default=True,
              help="self: each version's own METRIC; students (teachers only): the mean METRIC "
                   "of the students distilled from each version.")
@click.option("--student_arch", default="", help="by=students: count only students of this architecture.")
@click.option("--method", default="", help="by=students: count only students of this KD method.")
@click.option("--max_latency_ms", default="", help="only versions (by=students: students) that answer one image "
              "within this many ms on the CPU, as measured when registered")
@click.option("--max_params", default="", help="only versions (by=students: students) with at most this many "
              "parameters")
@click.option("--measure", type=click.BOOL, default=False, show_default=True,
              help="first measure the cost of every version (by=students: and of its students) that lacks it")
@click.option("--trust_unverified", type=click.BOOL, default=False, show_default=True,
              help="measure=true: measure a version whose files the registry holds no SHA-256 record of, as it is")
def main(model, metric, alias, force, by, student_arch, method, max_latency_ms, max_params, measure,
         trust_unverified):
    """Point ALIAS at a version of MODEL and print what changed."""
    budget = {key: _positive(key, value) for key, value in (("max_latency_ms", max_latency_ms),
                                                             ("max_params", max_params)) if value.strip()}
    if measure:
        lines, warnings = predict.measure_unmeasured(model, students=by == "students",
                                                     trust_unverified=trust_unverified)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        for line in lines:
            print(line, flush=True)
    print(promotion.promote(model, metric=metric, alias=alias, force=force, by=by,
                           student_arch=student_arch, method=method, budget=budget))


def _positive(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise TTKDError(f"invalid {key}: {text!r}; give a number > 0")
    return value


if __name__ == "__main__":
    run(main)
