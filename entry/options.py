"""Options shared by the entry points, and the wrapper that turns errors into one line."""

from __future__ import annotations

import functools
import os
import sys
import traceback

import click

from ttkd.data import LOADERS
from ttkd.errors import TTKDError
from ttkd.models import names as arch_names
from ttkd.train import TrainConfig

POSITIVE = click.FloatRange(min=0, min_open=True)
DEFAULTS = TrainConfig()


def _compose(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


data_options = _compose(
    click.option("--dataset", type=click.Choice(sorted(LOADERS)), default="digits", show_default=True,
                 help="Data set to train and validate on."),
    click.option("--data_dir", default="", help="Folder holding the data set's files "
                 "(downloaded there if missing); default ./data."),
)

train_options = _compose(
    click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.epochs, show_default=True),
    click.option("--batch_size", type=click.IntRange(min=1), default=DEFAULTS.batch_size,
                 show_default=True, help="Images per optimiser step."),
    click.option("--lr", type=POSITIVE, default=DEFAULTS.lr, show_default=True,
                 help="Initial SGD learning rate (cosine-annealed to 0)."),
    click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS.seed, show_default=True),
    click.option("--device", default=DEFAULTS.device, show_default=True,
                 help="auto, cpu, cuda or cuda:N."),
)


def arch_option(default: str, help: str):
    return click.option("--arch", type=click.Choice(arch_names()), default=default,
                        show_default=True, help=help)


def register_option(help: str):
    return click.option("--register_as", default="", help=help)


def train_config(epochs, batch_size, lr, seed, device) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)


def run(command: click.Command, args: list[str] | None = None) -> None:
    """Run ``command``; a user error becomes one line on stderr and exit status 2 (bad
    parameter) or 1 (anything else the user can fix). Set TTKD_DEBUG=1 for tracebacks."""
    try:
        command.main(args, standalone_mode=False, prog_name=command.name)
    except click.BadParameter as exc:
        _fail(command.name, _bad_parameter(exc), 2)
    except click.ClickException as exc:
        _fail(command.name, exc.format_message(), 2)
    except TTKDError as exc:
        _fail(command.name, str(exc), 1)
    except (KeyboardInterrupt, click.Abort):
        _fail(command.name, "interrupted", 130)


def _bad_parameter(exc: click.BadParameter) -> str:
    """'invalid NAME: WHAT WAS WRONG; NAME must be WHAT IS ALLOWED'."""
    if exc.param is None:
        return exc.message
    name, kind = exc.param.name, exc.param.type
    if isinstance(exc, click.MissingParameter):
        return f"missing {name}: {exc.param.help} (-P {name}=...)"
    if isinstance(kind, (click.IntRange, click.FloatRange)):
        number = "an integer" if isinstance(kind, click.IntRange) else "a number"
        allowed = f"{number} with {kind._describe_range().replace('x', name)}"
    elif isinstance(kind, click.Choice):
        allowed = f"one of {', '.join(map(str, kind.choices))}"
    else:
        allowed = f"a valid {kind.name}"
    return f"invalid {name}: {exc.message.rstrip('.')}; {name} must be {allowed}"


def _fail(name: str, message: str, status: int) -> None:
    if os.environ.get("TTKD_DEBUG"):
        traceback.print_exc()
    print(f"ttkd {name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def command(name: str):
    """``click.command`` with our name and help layout."""
    return functools.partial(click.command, name=name,
                             context_settings={"help_option_names": ["-h", "--help"]})()
