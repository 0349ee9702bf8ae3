"""`mlflow run . -e distill`: distil a student from a frozen teacher from the registry."""

import click

from entry.options import POSITIVE, arch_option, command, data_options, register_option, run, train_config, train_options
from ttkd import stages


@command("distill")
@click.option("--teacher", required=True,
              help="Frozen teacher: NAME, NAME@ALIAS, NAME/VERSION, models:/... or runs:/...")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Weight of the KL term: (1 − α)·CE + α·T²·KL(teacher ‖ student).")
@click.option("--temperature", type=POSITIVE, default=4.0, show_default=True)
@data_options
@arch_option("mlp", "Student network to train.")
@train_options
@register_option("Registered model name; default DATASET-ARCH-kd.")
def main(teacher, alpha, temperature, dataset, data_dir, arch, epochs, batch_size, lr, seed,
         device, register_as):
    """Distil student ARCH from a frozen TEACHER and register it."""
    stages.distill(teacher=teacher, alpha=alpha, temperature=temperature, arch=arch,
                   dataset=dataset, data_dir=data_dir or None,
                   train=train_config(epochs, batch_size, lr, seed, device),
                   register_as=register_as or None)


if __name__ == "__main__":
    run(main)
