"""`mlflow run . -e teach`: train a teacher against a frozen student from the registry."""

import click

from entry.options import POSITIVE, arch_option, command, data_options, register_option, run, train_config, train_options
from ttkd import stages


@command("teach")
@click.option("--student", required=True,
              help="Frozen student: NAME, NAME@ALIAS, NAME/VERSION, models:/... or runs:/...")
@click.option("--weight", type=float, default=0.005, show_default=True,
              help="w in CE + w·T²·KL(teacher ‖ student): > 0 trained, 0 normal, < 0 nasty.")
@click.option("--temperature", type=POSITIVE, default=4.0, show_default=True)
@data_options
@arch_option("cnn", "Teacher network to train.")
@train_options
@register_option("Registered model name; default DATASET-ARCH-{trained,normal,nasty}.")
def main(student, weight, temperature, dataset, data_dir, arch, epochs, batch_size, lr, seed,
         device, register_as):
    """Train teacher ARCH against a frozen STUDENT and register it."""
    stages.teach(student=student, weight=weight, temperature=temperature, arch=arch,
                 dataset=dataset, data_dir=data_dir or None,
                 train=train_config(epochs, batch_size, lr, seed, device),
                 register_as=register_as or None)


if __name__ == "__main__":
    run(main)
