"""Options shared by the entry points, and the wrapper that turns errors into one line.

Training options are generated from ``ttkd.config.PARAMS``: every option is a string
(``None`` when not given) and ``ttkd.config.resolve`` parses and checks it, together
with the preset's values, so there is one set of checks for every source.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from ttkd import config, stages
from ttkd.errors import TTKDError

PARTNER = {"teach": "student", "distill": "teacher"}  # the frozen network each stage needs


def command(name: str):
    return click.command(name=name, context_settings={"help_option_names": ["-h", "--help"]})


def stage_options(names: tuple[str, ...]):
    """One ``--NAME`` option per parameter (named exactly as the MLflow parameter), and ``--preset``."""
    def apply(f):
        for name in reversed(names):
            p = config.PARAMS[name]
            default = (len(p.default) if p.kind == "seeds" else ",".join(map(str, p.default))
                       if p.kind in ("ints", "floats", "strs") else p.default)
            f = click.option(f"--{name}", default=None,
                             help=f"{p.help} [default: {default if default != '' else 'none'}]")(f)
        return click.option("--preset", default=None,
                            help="experiments/NAME.toml (or a path to a .toml file); "
                                 "options given here override it")(f)
    return apply


def start(stage: str, given: dict, preset: str | None) -> None:
    """Check the parameters of a single ``stage`` and run it, or resume it."""
    cfg = config.resolve(stage, given, preset)
    if cfg.values["resume"]:
        stages.resume(stage, cfg.values["resume"])
        return
    partner = PARTNER.get(stage)
    if partner and not cfg.values[partner]:
        raise TTKDError(f"missing {partner}: the frozen {partner}, as NAME, NAME@ALIAS, "
                        f"NAME/VERSION, models:/... or runs:/... (-P {partner}=...)")
    getattr(stages, stage)(**cfg.stage_kwargs())


def run(command: click.Command, args: list[str] | None = None) -> None:
    """Run ``command``; a user error becomes one line on stderr and exit status 2 (bad
    command-line syntax) or 1 (anything else the user can fix). TTKD_DEBUG=1 shows tracebacks."""
    try:
        command.main(args, standalone_mode=False, prog_name=command.name)
    except click.BadParameter as exc:
        _fail(command.name, _bad_parameter(exc), 2)
    except click.ClickException as exc:
        _fail(command.name, exc.format_message(), 2)
    except TTKDError as exc:
        _fail(command.name, str(exc), exc.exit_code)
    except (KeyboardInterrupt, click.Abort):
        _fail(command.name, "interrupted", 130)


def _bad_parameter(exc: click.BadParameter) -> str:
    if exc.param is None:
        return exc.message
    if isinstance(exc, click.MissingParameter):
        return f"missing {exc.param.name}: {exc.param.help} (-P {exc.param.name}=...)"
    return f"invalid {exc.param.name}: {exc.message.rstrip('.')}"


def _fail(name: str, message: str, status: int) -> None:
    if os.environ.get("TTKD_DEBUG"):
        traceback.print_exc()
    print(f"ttkd {name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)
