"""`mlflow run . -e baseline`: train a network from scratch with cross-entropy."""

import click

from entry.options import arch_option, command, data_options, register_option, run, train_config, train_options
from ttkd import stages


@command("baseline")
@data_options
@arch_option("mlp", "Network to train.")
@train_options
@register_option("Registered model name; default DATASET-ARCH.")
def main(dataset, data_dir, arch, epochs, batch_size, lr, seed, device, register_as):
    """Train ARCH from scratch with cross-entropy and register it."""
    stages.baseline(arch=arch, dataset=dataset, data_dir=data_dir or None,
                    train=train_config(epochs, batch_size, lr, seed, device),
                    register_as=register_as or None)


if __name__ == "__main__":
    run(main)
