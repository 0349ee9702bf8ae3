"""`mlflow run .`: the whole Trained-Teacher study on one data set."""

import click

from entry.options import POSITIVE, command, data_options, run, train_config, train_options
from ttkd import stages
from ttkd.models import names as arch_names


@command("main")
@data_options
@click.option("--student_arch", type=click.Choice(arch_names()), default="mlp", show_default=True)
@click.option("--teacher_arch", type=click.Choice(arch_names()), default="cnn", show_default=True)
@train_options
@click.option("--weight", type=POSITIVE, default=0.005, show_default=True,
              help="w of the trained teacher (the normal teacher uses 0).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.9, show_default=True)
@click.option("--temperature", type=POSITIVE, default=4.0, show_default=True,
              help="T of both the teach and the distill stage.")
@click.option("--register_as", default="",
              help="Prefix of the registered names (PREFIX-student, PREFIX-teacher-trained, ...); "
                   "default DATASET.")
def main(dataset, data_dir, student_arch, teacher_arch, epochs, batch_size, lr, seed, device,
         weight, alpha, temperature, register_as):
    """Baseline student, normal and trained teacher, a KD student from each, compared."""
    table = stages.study(student_arch=student_arch, teacher_arch=teacher_arch, weight=weight,
                         alpha=alpha, temperature=temperature, dataset=dataset,
                         data_dir=data_dir or None, register_as=register_as or None,
                         train=train_config(epochs, batch_size, lr, seed, device))
    print(table)


if __name__ == "__main__":
    run(main)
