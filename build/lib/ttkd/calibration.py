"""Measuring training paths: a few timed steps of each, and what a path costs before its first step.

The engine builds one step function per path it could take (float32, bf16, each eager or
compiled), each on copies of the real networks and the real batch shape; :func:`measure`
times them in alternating rounds and caches the figures per ``key`` (the networks, the
batch shape, the device, the thread count and the torch version), so that the second
stage of a study or a sweep with the same key measures nothing again, and a path
measured once (a compiled one costs its compile time) is never measured twice. The engine
decides from the figures (``ttkd.choice.choose_step``).

The cache is one JSON file, ``calibration.json`` under :func:`cache_dir` (``$TTKD_CACHE_DIR``,
default ``$XDG_CACHE_HOME/ttkd``, else ``~/.cache/ttkd``); delete it to measure again. It
is read as JSON only, so nothing in it can run code. Nothing here knows about MLflow or
prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROUNDS = 2             # alternating rounds per path: a slow spell of the machine hits both
MIN_STEPS = 2          # timed steps per round, at least...
MIN_SECONDS = 0.25     # ...and until this long has passed (seconds per round)...
MAX_STEPS = 30         # ...but no more steps than this
# a long stage is worth a longer look: after ROUNDS, more alternating rounds until the timing has
# taken this share of the stage's expected time, within MAX_MEASURE_S (a 17-hour CIFAR stage: 30 s)
MEASURE_SHARE = 0.002
MAX_MEASURE_S = 30.0


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the paths asked for cost."""

    rates: dict[str, float]       # training images per second of each path
    setup_s: dict[str, float]     # seconds a path pays once, before its steps run at that rate (compiling)
    cached: bool = False          # every figure came from the cache


def cache_dir() -> Path:
    return Path(os.environ.get("TTKD_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ttkd")


def cache_file() -> Path:
    return cache_dir() / "calibration.json"


def _read_cache() -> dict:
    try:
        entries = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again
    return entries if isinstance(entries, dict) else {}


def cached(key: str) -> Measured:
    """The figures cached under ``key`` (none: empty)."""
    entry = _read_cache().get(key)
    try:
        rates = {str(k): float(v) for k, v in entry["rates"].items()}
        setup = {str(k): float(entry["setup_s"].get(k, 0.0)) for k in rates}
        return Measured(rates, setup, cached=True)
    except (TypeError, KeyError, ValueError, AttributeError):
        return Measured({}, {}, cached=True)


def _write_cache(key: str, measured: Measured) -> None:
    """Store ``measured`` under ``key``: written whole to a temporary file, then renamed, so
    that processes writing at once leave a whole file (the last one's)."""
    _store(_read_cache() | {key: {"rates": measured.rates, "setup_s": measured.setup_s}})


def _store(entries: dict) -> bool:
    """Replace the cache by ``entries``; False where it cannot be written (a read-only home:
    the next stage measures again)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        return False
    return True


STALE_FACTOR = 2.0  # an epoch that trains this many times faster than its cached rate shows the rate was
                    # measured while something else loaded the machine


def recheck(key: str, path: str, observed: float) -> bool:
    """Drop the figures cached under ``key`` when ``path``'s rate there is less than
    ``observed`` (images/s a whole epoch trained at, data and evaluation included, so never
    faster than the step alone) / STALE_FACTOR: they were measured under load, and the next
    stage measures again. Returns whether they were dropped."""
    figure = cached(key).rates.get(path)
    if figure is None or figure * STALE_FACTOR >= observed:
        return False
    entries = _read_cache()
    entries.pop(key, None)
    return _store(entries)


def rate(step: Callable[[], None], images: int, sync: Callable[[], None],
         clock: Callable[[], float] = time.perf_counter) -> float:
    """Images per second of ``step`` (``images`` per call): at least ``MIN_STEPS`` calls
    and ``MIN_SECONDS``, at most ``MAX_STEPS`` calls; ``sync`` waits for the device."""
    sync()
    started = clock()
    n = 0
    while n < MIN_STEPS or (clock() - started < MIN_SECONDS and n < MAX_STEPS):
        step()
        n += 1
        if n >= MIN_STEPS:
            sync()
    return n * images / (clock() - started)


def measure(key: str, paths: dict[str, Callable[[], Callable[[], None]]], images: int,
            sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter,
            stage_images: float = 0) -> Measured:
    """The figures of ``paths`` (name -> function that builds that path's step): those the
    cache has under ``key``, the others measured now and added to it. Each path's step is
    built and run once (first calls pay for compiling, kernel selection and allocations:
    that time less one step is the path's ``setup_s``), then timed in ``ROUNDS``
    alternating rounds, and more while the timing has taken less than MEASURE_SHARE of the
    stage's expected time (``stage_images`` at the best rate found), within MAX_MEASURE_S;
    a path's rate is its best round."""
    known = cached(key)
    todo = [name for name in paths if name not in known.rates]
    if not todo:
        return Measured({n: known.rates[n] for n in paths}, {n: known.setup_s[n] for n in paths}, cached=True)
    steps, first = {}, {}
    for name in todo:
        started = clock()
        steps[name] = paths[name]()
        steps[name]()
        sync()
        first[name] = clock() - started
    rates = dict.fromkeys(todo, 0.0)
    started, rounds = clock(), 0
    while rounds < ROUNDS or clock() - started < min(MAX_MEASURE_S,
                                                      MEASURE_SHARE * stage_images / max(rates.values())):
        for name in todo:
            rates[name] = max(rates[name], rate(steps[name], images, sync, clock))
        rounds += 1
    setup = {name: max(0.0, first[name] - images / rates[name]) for name in todo}
    merged = Measured(known.rates | rates, known.setup_s | setup)
    _write_cache(key, merged)
    return Measured({n: merged.rates[n] for n in paths}, {n: merged.setup_s[n] for n in paths})
