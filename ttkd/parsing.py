"""A parameter's value as the command line or a preset gives it, parsed and checked by its
row of the table (``ttkd.config``); and the sweep's axes: which stage of a study reads each
parameter, and ``axes=`` parsed value by value."""

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
