"""Choosing a training path by measurement: time a few steps of each, keep the fastest.

The engine builds one step function per path it could take (float32, bf16, ...), each on
copies of the real networks and the real batch shape; :func:`choose` times them in
alternating rounds and keeps the fastest, and caches the answer per ``key`` (the
networks, the batch shape, the device, the thread count and the torch version), so
that the second stage of a study or a sweep with the same key does not measure again.

The cache is one JSON file, ``calibration.json`` under ``$TTKD_CACHE_DIR`` (default
``$XDG_CACHE_HOME/ttkd``, else ``~/.cache/ttkd``); delete it to measure again. It is
read as JSON only, so nothing in it can run code. Nothing here knows about MLflow or
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


@dataclasses.dataclass(frozen=True)
class Choice:
    """The path kept and what it is based on."""

    path: str                     # the name of the path kept
    rates: dict[str, float]       # training images per second of each path measured
    cached: bool = False          # taken from the cache, measured by an earlier stage


def cache_file() -> Path:
    root = os.environ.get("TTKD_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ttkd"
    return Path(root) / "calibration.json"


def _read_cache() -> dict:
    try:
        entries = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again
    return entries if isinstance(entries, dict) else {}


def _write_cache(key: str, choice: Choice) -> None:
    """Add ``choice`` under ``key``: written whole to a temporary file, then renamed, so
    that processes writing at once leave a whole file (the last one's)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache() | {key: {"path": choice.path, "rates": choice.rates}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the next stage measures again


def cached(key: str, paths: tuple[str, ...]) -> Choice | None:
    """The cached choice for ``key`` if it was made between exactly these ``paths``."""
    entry = _read_cache().get(key)
    try:
        if set(entry["rates"]) == set(paths) and entry["path"] in paths:
            return Choice(entry["path"], {k: float(v) for k, v in entry["rates"].items()}, cached=True)
    except (TypeError, KeyError, ValueError):
        pass
    return None


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


def choose(key: str, paths: dict[str, Callable[[], Callable[[], None]]], images: int,
           sync: Callable[[], None] = lambda: None, margin: dict[str, float] | None = None,
           clock: Callable[[], float] = time.perf_counter) -> Choice:
    """The fastest of ``paths`` (name -> function that builds that path's step), from the
    cache under ``key`` or measured now and cached. Each path's step is built once, run
    once to warm up (first calls pay for kernel selection and allocations), then timed
    in ``ROUNDS`` alternating rounds; a path's rate is its best round. ``margin[name]``
    scales that path's rate in the comparison only (1.05: it must win by 5%)."""
    hit = cached(key, tuple(paths))
    if hit is not None:
        return hit
    steps = {}
    for name, build in paths.items():
        steps[name] = build()
        steps[name]()
    rates = dict.fromkeys(paths, 0.0)
    for _ in range(ROUNDS):
        for name, step in steps.items():
            rates[name] = max(rates[name], rate(step, images, sync, clock))
    margin = margin or {}
    best = max(rates, key=lambda name: rates[name] / margin.get(name, 1.0))
    choice = Choice(best, rates)
    _write_cache(key, choice)
    return choice
