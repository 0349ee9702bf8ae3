"""A parameter's value as the command line or a preset gives it, parsed and checked by its
row of the table (``ttkd.config``); the sweep's axes: which stage of a study reads each
parameter, and ``axes=`` parsed value by value; and a search's space (``space=``), each
range or choice checked by its parameter's row."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ttkd.config import TRAIN, Param, method_param_names, params
from ttkd.errors import TTKDError


def parse(param: Param, raw: Any) -> Any:
    """Turn ``raw`` (a command-line string or a TOML value) into the parameter's type and check it."""
    if param.kind == "axes":
        return parse_axes(raw)  # each value checked by its own row, each mistake said in its own words
    if param.kind == "space":
        return parse_space(raw)
    try:
        if param.kind == "int":
            number = float(raw) if isinstance(raw, str) else raw
            if isinstance(number, bool) or not float(number).is_integer():
                raise ValueError
            value = int(number)
        elif param.kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        elif param.kind in ("bool", "auto-bool"):
            words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            if param.kind == "auto-bool":
                words["auto"] = "auto"
            value = raw if isinstance(raw, bool) else words[str(raw).strip().lower()]
        elif param.kind == "seeds" and (isinstance(raw, int) or (isinstance(raw, str) and "," not in raw)):
            count = parse(Param(param.name, "int", 0, ""), raw)
            value = tuple(range(count)) if 1 <= count <= 10_000 else ()
        elif param.kind in ("ints", "floats", "strs", "seeds"):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            item = Param(param.name, {"floats": "float", "strs": "str"}.get(param.kind, "int"), 0, "")
            value = tuple(parse(item, i.strip() if isinstance(i, str) else i)
                          for i in items if str(i).strip())
            if param.kind == "floats" and not all(math.isfinite(v) for v in value):
                raise ValueError
        else:
            if not isinstance(raw, str):
                raise ValueError
            value = raw.strip()
    except (TypeError, ValueError, KeyError, TTKDError):
        raise TTKDError(f"invalid {param.name}: {raw!r}; {param.name} must be {param.what() or param.kind}") from None
    if param.kind == "float" and not math.isfinite(value):  # inf and nan pass every comparison check
        raise TTKDError(f"invalid {param.name}: {raw!r}; {param.name} must be {param.what() or 'a number'}, "
                        f"and finite")
    if not param.valid(value):
        raise TTKDError(f"invalid {param.name}: {raw!r}; {param.name} must be {param.what()}")
    return value


STAGE_ROLES = ("student", "teacher", "kd")  # a study's three kinds of stage, in order: baseline, teach, distill
_NO_AXIS = ("seed", "device", "milestones")  # seeds is an axis already; where, not what; a list


def axis_roles(name: str) -> frozenset[str]:
    """The roles whose stage reads parameter ``name`` of a study: ``student_arch`` and the
    student's training parameters (``student.lr``) feed the baseline and the KD students,
    ``teacher_arch``, ``temperature`` and ``teacher.lr`` the teachers, ``alpha``,
    ``kd_temperature`` and a method's own parameters the KD students, a training parameter
    named without a role all three. Empty: not a parameter a study's stages read."""
    role, _, bare = name.rpartition(".")
    if bare in TRAIN and bare not in _NO_AXIS and role in ("", "student", "teacher"):
        return frozenset({"student": ("student", "kd"), "teacher": ("teacher",), "": STAGE_ROLES}[role])
    if role:
        return frozenset()
    named = {"student_arch": ("student", "kd"), "teacher_arch": ("teacher",), "temperature": ("teacher",),
             "alpha": ("kd",), "kd_temperature": ("kd",)}
    return frozenset(named.get(name, ("kd",) if name in method_param_names() else ()))


def axis_home(name: str) -> str:
    """The first stage of a study that reads parameter ``name``: every point from there on
    carries its value."""
    return next(r for r in STAGE_ROLES if r in axis_roles(name))


def axis_names() -> list[str]:
    """Every parameter a sweep can take as an axis."""
    names = ["student_arch", "teacher_arch", "temperature", "alpha", "kd_temperature", *method_param_names()]
    trained = [n for n in TRAIN if n not in _NO_AXIS]
    return names + trained + [f"{role}.{n}" for role in ("student", "teacher") for n in trained]


def axis_param(name: str) -> Param:
    """The table's row for axis ``name`` (``student.lr`` is ``lr``'s)."""
    return params()[name.rpartition(".")[2]]


def show(value: Any) -> str:
    """A value as a point's key and a registered name write it: ``0.5``, ``resnet8``, ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def axes_text(axes: tuple[tuple[str, tuple], ...]) -> str:
    """Axes as ``axes=`` takes them (``kd_temperature=2,8;alpha=0.5``): how a sweep logs them."""
    return ";".join(f"{n}={','.join(map(show, v))}" for n, v in axes)


def parse_axes(raw: Any) -> tuple[tuple[str, tuple], ...]:
    """``NAME=V1,V2;NAME=V3`` (or pairs) as ``((NAME, (V1, V2)), (NAME, (V3,)))``, each value
    parsed and checked by its parameter's row; a name the study does not read, a repeated name
    or value, or no value is one line naming what to write instead."""
    items = [i for i in raw.split(";") if i.strip()] if isinstance(raw, str) else list(raw)
    axes = []
    for item in items:
        name, sep, values = item.partition("=") if isinstance(item, str) else (item[0], "=", item[1])
        name = name.strip()
        if name in ("seed", "seeds", "weight", "weights", "method", "methods"):
            plural = name if name.endswith("s") else name + "s"
            raise TTKDError(f"invalid axes: {name} is a sweep's own axis; give it as {plural}=… instead")
        if not sep or not axis_roles(name):
            raise TTKDError(f"invalid axes: {item!r}; write NAME=V1,V2;NAME=V3,V4 with each NAME one of "
                            f"{', '.join(axis_names())}")
        param = axis_param(name)
        parsed = tuple(parse(dataclasses.replace(param, name=name), v.strip() if isinstance(v, str) else v)
                       for v in (values.split(",") if isinstance(values, str) else values)
                       if str(v).strip())
        if not parsed or len(set(parsed)) != len(parsed) or name in dict(axes):
            raise TTKDError(f"invalid axes: {item!r}; give each NAME once, with one value or more, each once")
        axes.append((name, parsed))
    return tuple(axes)


@dataclasses.dataclass(frozen=True)
class Dist:
    """One parameter's range in a search's space: ``low``..``high`` (``log``: evenly on a log
    scale; whole numbers for an integer parameter), or one of ``choices``."""

    low: Any = None
    high: Any = None
    log: bool = False
    choices: tuple = ()
    integer: bool = False

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is one the sampler could ask for."""
        if self.choices:
            return value in self.choices
        return self.low <= value <= self.high and (not self.integer or float(value).is_integer())

    def text(self) -> str:
        """As ``space=`` takes it: ``0.1:0.99``, ``1:16:log``, ``kd,dkd``."""
        if self.choices:
            return ",".join(map(show, self.choices))
        return f"{show(self.low)}:{show(self.high)}" + (":log" if self.log else "")


Space = tuple[tuple[str, Dist], ...]


def space_json(space: Space) -> list:
    """A space as a run's JSON keeps it: ``[[NAME, {low, high, log, choices, integer}], ...]``."""
    return [[n, dataclasses.asdict(d)] for n, d in space]


def stored_space(space) -> Space:
    """A space as a run's JSON keeps it (lists, ``search.json``) back as :data:`Space`."""
    return tuple((n, d if isinstance(d, Dist) else Dist(d["low"], d["high"], d["log"], tuple(d["choices"]),
                                                        d["integer"])) for n, d in space)


def space_names() -> list[str]:
    """Every parameter a search's space can hold: the study's (``axis_names``), ``method``, and a
    teacher search's ``weight``."""
    return ["method", "weight", *axis_names()]


def space_text(space: Space) -> str:
    """A space as ``space=`` takes it: how a search logs it."""
    return ";".join(f"{n}={d.text()}" for n, d in space)


def parse_space(raw: Any) -> Space:
    """``NAME=A:B;NAME=A:B:log;NAME=X,Y,Z`` (or pairs of name and text) as ``((NAME, Dist), ...)``:
    a range for a number (``log``: sampled on a log scale; whole numbers for an integer
    parameter), a choice of values otherwise. Each end and each value is checked by its
    parameter's row; a reversed range, a log range through 0, a range over a word, an unknown or
    repeated name is one line naming what to write instead."""
    items = [i for i in raw.split(";") if i.strip()] if isinstance(raw, str) else list(raw)
    space: list[tuple[str, Dist]] = []
    for item in items:
        name, sep, text = item.partition("=") if isinstance(item, str) else (item[0], "=", item[1])
        name, text = name.strip(), str(text).strip()
        if name in ("seed", "seeds"):
            raise TTKDError(f"invalid space: {name} is not searched; a search trains every trial with one seed "
                            f"(seed=), and a verdict compares on fresh seeds (seeds=)")
        if not sep or not text or (name not in ("method", "weight") and not axis_roles(name)):
            raise TTKDError(f"invalid space: {item!r}; write NAME=LOW:HIGH, NAME=LOW:HIGH:log or NAME=V1,V2 "
                            f"separated by ';', with each NAME one of {', '.join(space_names())}")
        if name in dict(space):
            raise TTKDError(f"invalid space: {name} is given twice; give each parameter once")
        param = dataclasses.replace(params()[name] if name in ("method", "weight") else axis_param(name), name=name)
        space.append((name, _dist(name, param, text)))
    return tuple(space)


def _dist(name: str, param: Param, text: str) -> Dist:
    ends = [e.strip() for e in text.split(":")]
    if len(ends) == 1:
        values = tuple(parse(param, v.strip()) for v in text.split(",") if v.strip())
        if not values or len(set(values)) != len(values):
            raise TTKDError(f"invalid space: {name}={text}; give each value once")
        return Dist(choices=values)
    log = len(ends) == 3 and ends[2] == "log"
    if len(ends) > 3 or (len(ends) == 3 and not log) or param.kind not in ("int", "float"):
        what = "a number" if param.kind in ("int", "float") else "a word"
        raise TTKDError(f"invalid space: {name}={text}; {name} is {what}: write "
                        + (f"{name}=LOW:HIGH or {name}=LOW:HIGH:log" if what == "a number" else f"{name}=V1,V2"))
    low, high = parse(param, ends[0]), parse(param, ends[1])
    if low >= high:
        raise TTKDError(f"invalid space: {name}={text}; a range goes from its low end to a higher one "
                        f"(write {name}={ends[1]}:{ends[0]}, or one value as {name}={ends[0]},)")
    if log and low <= 0:
        raise TTKDError(f"invalid space: {name}={text}; a log range cannot reach 0 or below it: start it above 0")
    return Dist(low, high, log, integer=param.kind == "int")
