"""The space of a sweep: seeds x weights x methods, crossed with any parameter of the study.

An axis is a parameter and its values (``axes='kd_temperature=2,8;alpha=0.5,0.9'``). Each
parameter feeds the stages that read it (``ttkd.parsing.axis_roles``; the first is its home) and everything
downstream of them: a student architecture changes the baseline student, the teachers trained
against it and their KD students; a teacher's parameter its teacher and that teacher's KD
students; a KD parameter only the KD students, and a method's own parameter only the KD
students of that method. A point carries the values of the axes that feed it or anything it
needs, so two points differ exactly where what they train differs.
"""

from __future__ import annotations

import itertools
from typing import Any

from ttkd.parsing import axis_home
from ttkd.presets import method_params

Axes = tuple[tuple[str, tuple], ...]      # (name, its values), in the order they were given
Values = tuple[tuple[str, Any], ...]      # (name, one value): a point's own, in axis order

UPSTREAM = {"student": ("student",), "teacher": ("student", "teacher"), "kd": ("student", "teacher", "kd")}


def own_axes(axes: Axes, role: str, method: str | None = None) -> Axes:
    """The axes a point of ``role`` (a KD point: of ``method``) adds to the point it needs:
    those whose home is ``role`` (and, for a KD point, that its method reads)."""
    return tuple((n, v) for n, v in axes
                 if axis_home(n) == role and (role != "kd" or method is None or n in method_params("sweep", method)))


def combinations(axes: Axes) -> list[Values]:
    """Every choice of one value per axis, the first axis slowest."""
    return [tuple(zip((n for n, _ in axes), chosen)) for chosen in itertools.product(*(v for _, v in axes))]


def restrict(values: Values, role: str) -> Values:
    """The part of ``values`` that a point of ``role`` carries: the axes whose home is ``role``
    or a role upstream of it."""
    return tuple((n, v) for n, v in values if axis_home(n) in UPSTREAM[role])
