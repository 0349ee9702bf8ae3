"""Fenced attempts: which try at a run may still write into it.

A point of a sweep on Ray can be tried more than once: when its node stops answering,
Ray declares the node dead and runs the point again elsewhere, continuing the same
MLflow run from its checkpoint, while the first try, cut off but alive, may go on
training. The tracking store has no compare-and-swap, but a run's parameter is written
once and never changes, and that is enough for a fence:

- Each attempt has a token ``(generation, retry)``; the larger is the newer, whatever
  order the attempts reach the store in. The generation is counted by whoever starts
  the attempt: a sweep counts its own starts and resumes on its parent run
  (:func:`next_generation`), a resumed stage the attempts its run has had. The retry
  is Ray's attempt number for the task (0 off a cluster).
- An attempt claims its token as a parameter of the *holder* (the run itself, or, for a
  sweep's point, the sweep's parent run under the point's name), its value the run id.
- Before every write (a checkpoint, an epoch's metrics, the model, the registration, the
  run's end) the attempt reads the claims and stops, raising :class:`Superseded`, if a
  newer one exists or the newest names another run of its point; it then leaves the run
  as it is. A write already under way when the newer attempt claimed still lands (the
  check and the write are two requests): at most one, and the checkpoint digest catches
  a file that no longer matches its record.
- Registration is claimed once per holder (:func:`register_once`), so a point or a
  run registers its model at most once whatever the timing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import uuid

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ttkd.errors import TTKDError
from ttkd.tracking import registry
from ttkd.tracking.registry import ModelRef, retry_locked

POINT_TAG = "ttkd.point"           # a sweep point's run: the point's name
PREFIX = "ttkd.attempt."             # + G.R on a run; + p<point digest>.G.R on a sweep's parent run
GENERATION = "ttkd.generation."      # + G on a sweep's parent run: its G-th start or resume
REGISTRATION = "ttkd.registration"   # (+ .p<point digest> on a parent run): "RUN_ID G.R" of the attempt that registers

Token = tuple[int, int]


class Superseded(TTKDError):
    """A newer attempt took over this attempt's run (or its point): this one writes nothing more."""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One try at run ``run_id``, fenced by its ``token``'s claim on run ``holder``."""

    run_id: str
    holder: str
    point: str | None      # the sweep point's name, when the claims are on its parent run
    token: Token

    @property
    def prefix(self) -> str:
        return PREFIX + (f"p{_digest(self.point)}." if self.point else "")

    @property
    def name(self) -> str:
        return f"{self.token[0]}.{self.token[1]}"

    def newest(self) -> tuple[Token, str] | None:
        """The newest claim on the holder: its token and the run it names."""
        return _newest(MlflowClient().get_run(self.holder).data.params, self.prefix)

    def _stands(self, found: tuple[Token, str] | None) -> bool:
        return found is None or (found[0] <= self.token and found[1] == self.run_id)

    def current(self) -> bool:
        """Whether this attempt is still the newest of its run (and its run its point's)."""
        return self._stands(self.newest())

    def check(self) -> None:
        """Raise :class:`Superseded` unless this attempt may still write."""
        found = self.newest()
        if not self._stands(found):
            token, run_id = found
            what = f"run {run_id}" if run_id != self.run_id else "the same run"
            of = f" of point {self.point!r}" if self.point else ""
            raise Superseded(f"attempt {self.name} at run {self.run_id}{of} was superseded by attempt "
                             f"{token[0]}.{token[1]} ({what}), a retry elsewhere; it writes nothing more")


def _digest(point: str) -> str:
    return hashlib.sha256(point.encode()).hexdigest()[:16]


def _newest(params: dict[str, str], prefix: str) -> tuple[Token, str] | None:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\d+)")
    claims = {}
    for key, value in params.items():
        if m := pattern.fullmatch(key):
            claims[(int(m[1]), int(m[2]))] = value.split(" ")[0]
    if not claims:
        return None
    newest = max(claims)
    return newest, claims[newest]


def next_generation(parent_id: str) -> int:
    """Claim the next generation of a sweep's parent run (each start or resume of it is one)."""
    client = MlflowClient()
    for _ in range(20):
        params = client.get_run(parent_id).data.params  # above every generation and every point's claim
        taken = [int(k[len(GENERATION):]) for k in params if k.startswith(GENERATION) and k[len(GENERATION):].isdigit()]
        taken += [int(m[1]) for k in params if (m := re.fullmatch(re.escape(PREFIX) + r"p\w+\.(\d+)\.\d+", k))]
        generation = max(taken, default=0) + 1
        if _claim(parent_id, f"{GENERATION}{generation}", uuid.uuid4().hex):
            return generation
    raise TTKDError(f"run {parent_id} is being resumed by another process; wait for it, or stop it first")


def begin(run_id: str, *, parent_id: str | None = None, point: str | None = None, token: Token | None = None,
          fresh: bool = False) -> Attempt:
    """Claim an attempt at run ``run_id`` (a sweep's ``point`` under ``parent_id``, when
    given) with ``token``, or, without one, the next generation of its claims. A newer
    attempt already there raises :class:`Superseded`, and a ``fresh`` run (just opened,
    nothing in it) is deleted first."""
    holder = parent_id if point and parent_id else run_id
    attempt = Attempt(run_id, holder, point if holder != run_id else None, token or (0, 0))
    if token is None:
        found = attempt.newest()
        attempt = dataclasses.replace(attempt, token=((found[0][0] if found else 0) + 1, 0))
    if not _claim(holder, attempt.prefix + attempt.name, f"{run_id} {uuid.uuid4().hex[:12]}"):
        raise TTKDError(f"attempt {attempt.name} at run {run_id} is claimed by another process already; "
                        f"one stage (or sweep) at a time may continue it")
    try:
        attempt.check()
    except Superseded:
        if fresh:
            MlflowClient().delete_run(run_id)
        raise
    return attempt


def point_run(parent_id: str, point: str) -> str | None:
    """The run that the newest attempt at ``point`` of sweep run ``parent_id`` trains in."""
    found = _newest(MlflowClient().get_run(parent_id).data.params, f"{PREFIX}p{_digest(point)}.")
    return found[1] if found else None


def register_once(attempt: Attempt, model_uri: str, name: str, tags: dict[str, str]) -> ModelRef:
    """Register ``attempt``'s model (``model_uri``) as a version of ``name``, at most once per
    run (per point, for a sweep's point) whatever the timing: the attempt first claims the
    registration as a parameter of its holder, which the store keeps once, so of two
    attempts only one can claim it. An attempt that finds another's claim registers nothing
    and returns the version that attempt registered (it died after registering), or
    refuses if there is none."""
    attempt.check()
    base = REGISTRATION + (f".p{_digest(attempt.point)}" if attempt.point else "")
    client = MlflowClient()
    for n in range(1, 100):  # a claim whose run was deleted (its attempt declared dead) is void
        key = base if n == 1 else f"{base}.{n}"
        if _claim(attempt.holder, key, f"{attempt.run_id} {attempt.name}"):
            return registry.register(model_uri, name, tags)
        claimant, _, by = client.get_run(attempt.holder).data.params[key].partition(" ")
        found = registry.versions_of_run(claimant)
        if found:
            return found[-1]
        if claimant == attempt.run_id or client.get_run(claimant).info.lifecycle_stage != "deleted":
            break
    how = ("if it is dead, start the stage again" if claimant == attempt.run_id else
           f"if it is dead, delete that run (mlflow runs delete --run-id {claimant}) and resume the sweep")
    raise TTKDError(f"run {attempt.run_id}'s model was claimed for registration by attempt {by} of run {claimant}, "
                    f"which has registered nothing; {how}")


def _claim(run_id: str, key: str, value: str) -> bool:
    """Log parameter ``key`` = ``value`` on run ``run_id`` unless it holds another value
    (the store keeps a parameter once and refuses to change it): whether ours stands."""
    client = MlflowClient()
    try:
        retry_locked(lambda: client.log_param(run_id, key, value))
        return True
    except MlflowException:
        held = client.get_run(run_id).data.params
        if held.get(key) == value:
            return True  # a retried request that had landed
        if key not in held:
            raise
        return False
