"""Options shared by the entry points, and the wrapper that turns errors into one line.

Training options are generated from ``ttkd.config.PARAMS``: every option is a string
(``None`` when not given) and ``ttkd.presets.resolve`` parses and checks it, together
with the preset's values, so there is one set of checks for every source.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable

import click

from ttkd import build, config, console, distributed, presets, resuming, signals, stages, tracking
from ttkd.console import Terminal
from ttkd.errors import TTKDError
from ttkd.step import resolve_device

PARTNER = {"teach": "student", "distill": "teacher"}  # the frozen network each stage needs
_argv: list[str] = []  # the command line of this entry point, passed on to the processes it starts


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
    cfg = presets.resolve(stage, given, preset)
    partner = PARTNER.get(stage)
    if partner and not cfg.values[partner] and not cfg.values["resume"] and cfg.values["node_rank"] == 0:
        raise TTKDError(f"missing {partner}: the frozen {partner}, as NAME, NAME@ALIAS, "
                        f"NAME/VERSION, models:/... or runs:/... (-P {partner}=...)")

    def body() -> None:
        if cfg.values["resume"]:
            resuming.resume(stage, cfg.values["resume"], cfg)
        else:
            getattr(stages, stage)(**cfg.stage_kwargs())
    launched(stage, cfg, body)


def launched(name: str, cfg: presets.RunConfig, body: Callable[[], None]) -> None:
    """Run ``body`` (entry point ``entry.NAME`` with checked parameters ``cfg``) here, or
    as ``nproc`` processes started by torchrun, this same command in each. In those
    processes, the leader runs ``body`` and the others train beside it."""
    launch = distributed.Launch(**{k: cfg.values[k] for k in config.LAUNCH})
    device = resolve_device(cfg.values["device"]).type

    def lead() -> None:
        tracking.use_experiment(cfg.values["experiment"])
        body()

    if config.under_torchrun():
        if distributed.init(cuda=device == "cuda").leads:
            _keep_signals()  # torchrun's SIGTERM, once another process died, must not cut the leader's last words
            try:
                lead()
            finally:
                distributed.release()
        else:
            _follow()
    elif launch.processes > 1:
        for warning in launch.check(device):
            print(f"ttkd {name}: warning: {warning}", file=sys.stderr, flush=True)
        status = distributed.relaunch(f"entry.{name}", _without(_argv, config.LAUNCH), launch)
        if status:  # the process that failed has said why
            sys.exit(status)
    else:
        lead()


def _without(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (``--NAME VALUE`` or ``--NAME=VALUE``): the
    processes a launcher starts know they are launched, and torchrun would read these."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.lstrip("-").split("=", 1)[0] in names and arg.startswith("--"):
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def _keep_signals() -> None:
    """In a process of a group, a SIGINT or SIGTERM outside training is kept for the next
    step of training instead of ending the process at once. When one process dies, torchrun
    sends the others SIGTERM within a tenth of a second; the leader, already failing on the
    lost contact, must still end its run and say which run to resume."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signals.note_signal)
    signals.note_signal.installed = True


def _follow() -> None:
    """A follower's whole life: train the stages the leader sends. A SIGINT or SIGTERM
    that comes between two steps of training is kept for the next step, when every
    process stops together. It says nothing when the leader stops or is stopped: the
    leader (or the launcher) says why."""
    _keep_signals()
    try:
        distributed.follow(build.follow_stage, expected=build.FOLLOWER_STOPS)
    except (RuntimeError, KeyboardInterrupt) as exc:
        if os.environ.get("TTKD_DEBUG"):
            traceback.print_exc()
        sys.exit(130 if isinstance(exc, KeyboardInterrupt) else 1)


def show_log() -> None:
    """The library reports through ``logging`` (logger ``ttkd``); an entry point shows it."""
    logger = logging.getLogger("ttkd")
    if not any(isinstance(h, Terminal) for h in logger.handlers):
        logger.addHandler(Terminal())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # once, here, whatever the root logger does
    console.show_progress()


def run(command: click.Command, args: list[str] | None = None) -> None:
    """Run ``command``; a user error becomes one line on stderr and exit status 2 (bad
    command-line syntax) or 1 (anything else the user can fix). TTKD_DEBUG=1 shows tracebacks."""
    global _argv
    _argv = list(sys.argv[1:] if args is None else args)
    show_log()
    status = 0
    try:
        command.main(args, standalone_mode=False, prog_name=command.name)
    except click.BadParameter as exc:
        status = _fail(command.name, _bad_parameter(exc), 2)
    except click.ClickException as exc:
        status = _fail(command.name, exc.format_message(), 2)
    except TTKDError as exc:
        status = _fail(command.name, str(exc), exc.exit_code)
    except (KeyboardInterrupt, click.Abort):
        status = _fail(command.name, "interrupted", 130)
    except SystemExit as exc:
        status = exc.code
    except Exception:
        if distributed.world() is None:
            raise
        traceback.print_exc()  # a bug, not a user error: its traceback, then the same exit
        status = 1
    if distributed.world() is not None:
        # A process of a group ends here: torch 2.14 may abort in its own teardown at the
        # interpreter's exit (one exit in about 25 on this CPU), whatever our status was.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status if isinstance(status, int) else 1)
    if status:
        sys.exit(status)


def _bad_parameter(exc: click.BadParameter) -> str:
    if exc.param is None:
        return exc.message
    if isinstance(exc, click.MissingParameter):
        return f"missing {exc.param.name}: {exc.param.help} (-P {exc.param.name}=...)"
    return f"invalid {exc.param.name}: {exc.message.rstrip('.')}"


def _fail(name: str, message: str, status: int) -> int:
    if os.environ.get("TTKD_DEBUG"):
        traceback.print_exc()
    print(f"ttkd {name}: error: {message}", file=sys.stderr, flush=True)
    return status
