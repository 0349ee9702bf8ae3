"""A sweep's report: statistics over seeds, a markdown table with plain words, figures.

Every accuracy is a mean over seeds with its 95% confidence interval (Student's t with
n − 1 degrees of freedom). A comparison between two kinds of student is **paired**:
the difference is taken seed by seed (same seed, same baseline student, same data
order), and the interval is that of the mean difference. A difference whose interval
contains 0 is "within noise". Nothing here talks to MLflow.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from ttkd.parsing import show
from ttkd.stages import teacher_kind as kind
from ttkd.studies.plan import Grid, Point
from ttkd.studies.report.figures import figures  # noqa: F401 (part of the report's interface)
from ttkd.studies.report.statistics import (  # noqa: F401 (part of the report's interface)
    CONFIDENCE,
    OUTLIER_MIN_PP,
    Interval,
    Robust,
    interval,
    outliers,
    paired,
    paired_robust,
    robust,
)


@dataclasses.dataclass(frozen=True)
class PointValues:
    """What the report needs of one finished point."""

    val_acc: float
    agreement: float | None
    model: str
    run_id: str
    curve: tuple[float, ...] = ()   # val_acc per epoch (KD students)
    cost: dict[str, float] = dataclasses.field(default_factory=dict)  # params, macs, latency_ms_b1_cpu, ...


def build(grid: Grid, values: dict[Point, PointValues], failed: dict[Point, str]) -> dict:
    """The report as plain data (``report.json``): a row per configuration (a point without its
    seed: role, weight, method and the values of the other axes), its figures over seeds."""
    def acc(template: Point, field: str = "val_acc") -> dict[int, float]:
        found = {s: getattr(values[p], field) for s in grid.seeds
                 if (p := dataclasses.replace(template, seed=s)) in values and getattr(values[p], field) is not None}
        return found

    def row(template: Point) -> dict:
        mine = acc(template)
        return {"values": dict(template.values), "val_acc": _dict(interval(mine.values())),
                "median": _dict(robust(mine.values())), "far": _far(mine, template), "per_seed": mine}

    templates = [p for p in grid.points() if p.seed == grid.seeds[0]]
    order = _order(grid)
    no_kd = [row(t) for t in templates if t.role == "student"]
    teachers = [row(t) | {"weight": t.weight, "kind": kind(t.weight), "agreement":
                          _dict(interval(acc(t, "agreement").values()))} for t in templates if t.role == "teacher"]
    students = []
    for t in sorted((t for t in templates if t.role == "kd"), key=order):
        mine, normal, alone = acc(t), acc(dataclasses.replace(t, weight=0.0)), acc(t.needs.needs)
        students.append(row(t) | {
            "weight": t.weight, "kind": kind(t.weight), "method": t.method,
            "vs_normal": _dict(paired(mine, normal)) if t.weight != 0 else None,
            "vs_normal_median": _dict(paired_robust(mine, normal)) if t.weight != 0 else None,
            "vs_no_kd": _dict(paired(mine, alone)), "vs_no_kd_median": _dict(paired_robust(mine, alone)),
            "agreement": _dict(interval(acc(t, "agreement").values())),
            "curve": _curve([values[dataclasses.replace(t, seed=s)].curve for s in mine]),
        })
    run_of = {p.key: v.run_id for p, v in values.items()}
    return {
        "costs": _costs(templates, acc, order) if values and all(v.cost for v in values.values()) else [],
        "grid": dataclasses.asdict(grid) | {"axes": [[n, list(v)] for n, v in grid.axes]},
        "axes": [n for n, _ in grid.axes], "confidence": CONFIDENCE,
        "no_kd": no_kd, "students": students, "teachers": teachers,
        "far": [f | {"run_id": run_of[f["point"]]} for r in [*no_kd, *teachers, *students] for f in r["far"]],
        "failed": [{"point": p.key, "error": e} for p, e in failed.items()],
        "points": [{"point": p.key, "role": p.role, "seed": p.seed, "weight": p.weight, "method": p.method,
                    "values": dict(p.values), "val_acc": v.val_acc, "agreement": v.agreement, "model": v.model,
                    "run_id": v.run_id} for p, v in values.items()],
    }


def _order(grid: Grid):
    """Rows method by method, then by the other axes' values as given, then by weight."""
    def key(t: Point) -> tuple:
        at = [dict(grid.axes)[n].index(v) for n, v in t.values]
        return (grid.methods.index(t.method) if t.method else -1, at, grid.weights.index(t.weight)
                if t.weight is not None else -1)
    return key


def _costs(templates: list[Point], acc, order) -> list[dict]:
    """Per model (each no-KD student, teacher and KD student configuration): its cost, mean
    over seeds; a KD student's also as ratios to its teacher's and its no-KD student's (x fewer
    parameters and MACs, x faster at batch 1) with its paired Δ val_acc to each."""
    def versus(mine: dict, theirs: dict, delta: Interval) -> dict:
        return {"x_params": theirs["params"] / mine["params"], "x_macs": theirs["macs"] / mine["macs"],
                "x_faster": theirs["latency_ms_b1_cpu"] / mine["latency_ms_b1_cpu"], "delta": _dict(delta)}
    costs = {t: acc(t, "cost") for t in templates}
    mean = {t: {k: float(np.mean([c[k] for c in found.values()])) for k in ("params", "macs", "latency_ms_b1_cpu")}
            | {"latency_std": float(np.std([c["latency_ms_b1_cpu"] for c in found.values()])), "n": len(found)}
            for t, found in costs.items() if found}
    rows = []
    students = [t for t in templates if t.role == "student"]
    teachers = [t for t in templates if t.role == "teacher"]
    for t in students + [x for teacher in teachers
                         for x in [teacher, *sorted((k for k in templates if k.needs == teacher), key=order)]]:
        if t not in mean:
            continue
        r = {"role": t.role, "weight": t.weight, "method": t.method, "values": dict(t.values),
             "val_acc": _dict(interval(acc(t).values())), **mean[t]}
        if t.role == "kd":
            teacher, alone = t.needs, t.needs.needs
            r["vs_teacher"] = versus(mean[t], mean[teacher], paired(acc(t), acc(teacher))) if teacher in mean else None
            r["vs_no_kd"] = versus(mean[t], mean[alone], paired(acc(t), acc(alone))) if alone in mean else None
        rows.append(r)
    return rows


def headline_metrics(report: dict) -> dict[str, float]:
    """The report's means as metrics of the parent run: ``no_kd.val_acc``,
    ``METHOD.wW.val_acc`` and ``METHOD.wW.vs_w0`` (the paired difference), each name followed
    by the row's other axes (``kd.w0.005.kd_temperature_2.val_acc``)."""
    found = {f"no_kd{_slug(r)}.val_acc": r["val_acc"]["mean"] for r in report["no_kd"]}
    for r in report["students"]:
        found[f"{r['method']}.w{r['weight']:g}{_slug(r)}.val_acc"] = r["val_acc"]["mean"]
        if r["vs_normal"] is not None:
            found[f"{r['method']}.w{r['weight']:g}{_slug(r)}.vs_w0"] = r["vs_normal"]["mean"]
    for t in report["teachers"]:
        found[f"teacher.w{t['weight']:g}{_slug(t)}.val_acc"] = t["val_acc"]["mean"]
    return {k: v for k, v in found.items() if v is not None and not math.isnan(v)}


def _slug(row: dict) -> str:
    """A row's axis values as part of a metric's name (letters, digits, ``_ - . /`` only)."""
    return "".join("." + re.sub(r"[^\w\-./]", "-", f"{n}_{show(v)}") for n, v in row["values"].items())


def _far(per_seed: dict[int, float], template: Point) -> list[dict]:
    """The seeds of one row (``template``: its point at any seed) whose val_acc lies far from
    the others' (``outliers``), each named by its point."""
    if not per_seed:
        return []
    median = robust(per_seed.values()).median
    return [{"point": dataclasses.replace(template, seed=seed).key, "seed": seed, "val_acc": value,
             "median": median, "n": len(per_seed)} for seed, value in sorted(outliers(per_seed).items())]


def _dict(i: Interval | Robust) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(i).items()}


def _curve(curves: list[tuple[float, ...]]) -> dict | None:
    """Per epoch: the mean over seeds and its interval (seeds with the full curve only)."""
    longest = max((len(c) for c in curves), default=0)
    full = [c for c in curves if len(c) == longest]
    if not full or longest == 0:
        return None
    per_epoch = [_dict(interval(c[e] for c in full)) for e in range(longest)]
    return {"epochs": list(range(1, longest + 1)), "mean": [i["mean"] for i in per_epoch],
            "low": [i["low"] for i in per_epoch], "high": [i["high"] for i in per_epoch], "n": len(full)}


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _mean_std(i: dict) -> str:
    if i["n"] == 0:
        return "n/a"
    return _num(i["mean"]) + (f" ± {_num(i['std'])}" if i["std"] is not None else "")


def _diff(i: dict | None) -> str:
    if i is None:
        return "(reference)"
    if i["n"] == 0:
        return "n/a"
    if i["low"] is None:
        return f"{_num(i['mean'], True)} (1 seed)"
    return f"{_num(i['mean'], True)} [{_num(i['low'], True)}, {_num(i['high'], True)}]"


def _seeds(row: dict) -> str:
    """A row's seed count, and how many of them lie far from the others."""
    far = len(row.get("far", ()))
    return f"{row['val_acc']['n']}" + (f" ({far} far off)" if far else "")


def _median(r: dict) -> str:
    if r["n"] == 0:
        return "n/a"
    if r["low"] is None:
        return _num(r["median"])
    return f"{_num(r['median'])} [{_num(r['low'])}, {_num(r['high'])}]"


def _level(report: dict) -> str:
    """What the rank intervals cover: it depends on the number of seeds."""
    rows = [*report["no_kd"], *report["students"], *report["teachers"]]
    levels = sorted({(r["median"]["n"], r["median"]["level"]) for r in rows if r["median"]["n"] > 1})
    if not levels:
        return "none with one seed"
    return ", ".join(f"{level:.0%} for {n} seeds" for n, level in levels)


def _w(w: float) -> str:
    return f"{w:g} ({kind(w)})"


def _cells(axes: list[str], row: dict) -> str:
    """A row's value of each of ``axes``, as table cells (blank where the row has none)."""
    return "".join(f" {show(row['values'][n]) if n in row['values'] else ''} |" for n in axes)


def _columns(report: dict, rows: list[dict]) -> tuple[list[str], str, str]:
    """The axes some of ``rows`` have, with their table header's cells and rule."""
    axes = [n for n in report["axes"] if any(n in r["values"] for r in rows)]
    return axes, "".join(f" {n} |" for n in axes), "---|" * len(axes)


def _with(row: dict) -> str:
    """A row's axis values in words: `` (kd_temperature=2, alpha=0.5)``, or nothing."""
    return f" ({', '.join(f'{n}={show(v)}' for n, v in row['values'].items())})" if row["values"] else ""


def markdown(report: dict) -> str:
    """The tables and, under them, in words, which differences are within noise."""
    seeds = len(report["grid"]["seeds"])
    pct = int(report["confidence"] * 100)
    axes, heads, rule = _columns(report, [*report["no_kd"], *report["students"]])
    lines = [f"## Students: val_acc (%) over {seeds} seed{'s' * (seeds > 1)}",
             "",
             f"mean ± std over seeds; median [rank interval, {_level(report)}]; Δ: paired difference per "
             f"seed (pp), mean [{pct}% CI]",
             "",
             f"| teacher w | method |{heads} seeds | student val_acc | median | Δ vs student of the w = 0 teacher "
             "| Δ vs no-KD student | agreement with teacher (%) |",
             f"|---|---|{rule}---:|---:|---:|---:|---:|---:|"]
    lines += [f"| (no KD) | |{_cells(axes, r)} {_seeds(r)} | {_mean_std(r['val_acc'])} | {_median(r['median'])} "
              f"| | (reference) | |" for r in report["no_kd"]]
    for r in report["students"]:
        lines.append(f"| {_w(r['weight'])} | {r['method']} |{_cells(axes, r)} {_seeds(r)} "
                     f"| {_mean_std(r['val_acc'])} | {_median(r['median'])} | {_diff(r['vs_normal'])} "
                     f"| {_diff(r['vs_no_kd'])} | {_mean_std(r['agreement'])} |")
    axes, heads, rule = _columns(report, report["teachers"])
    lines += ["", "## Teachers", "",
              f"| w |{heads} seeds | teacher val_acc (%) | median | agreement with its frozen student (%) |",
              f"|---|{rule}---:|---:|---:|---:|"]
    for t in report["teachers"]:
        lines.append(f"| {_w(t['weight'])} |{_cells(axes, t)} {_seeds(t)} | {_mean_std(t['val_acc'])} "
                     f"| {_median(t['median'])} | {_mean_std(t['agreement'])} |")
    lines += _cost_lines(report)
    lines += ["", "## In words", ""] + [f"- {s}" for s in sentences(report)]
    if report.get("far"):
        lines += ["", "## Seeds far from the others", "",
                  "each is kept in its row's mean, which it pulls; the median beside it is not moved by it; "
                  "its run is tagged `ttkd.far_off`", ""]
        lines += [f"- {f['point']}: val_acc {f['val_acc']:.2f}% against a median of {f['median']:.2f}% over "
                  f"{f['n']} seeds (run {f['run_id']})" for f in report["far"]]
    if report["failed"]:
        lines += ["", "## Points that did not finish", ""]
        lines += [f"- {f['point']}: {f['error']}" for f in report["failed"]]
    return "\n".join(lines) + "\n"


def _cost_lines(report: dict) -> list[str]:
    """The cost table: what each model costs to run, and each KD student against its teacher."""
    if not report.get("costs"):
        return []
    pct = int(report["confidence"] * 100)
    axes, heads, rule = _columns(report, report["costs"])
    lines = ["", "## What the models cost", "",
             "measured on the served network, CPU, 1 thread; a KD student against its teacher: x fewer "
             f"parameters, MACs, x faster at batch 1, and its paired Δ val_acc (pp, mean [{pct}% CI])", "",
             f"| model | w | method |{heads} parameters | MACs per image "
             "| ms per image (batch 1) | vs its teacher: params / MACs / speed | Δ val_acc vs teacher "
             "| Δ val_acc vs no-KD student |",
             f"|---|---|---|{rule}---:|---:|---:|---:|---:|---:|"]
    names = {"student": "student, no KD", "teacher": "teacher", "kd": "KD student"}
    for r in report["costs"]:
        w = _w(r["weight"]) if r["weight"] is not None else ""
        them = r.get("vs_teacher")
        ratios = (f"{them['x_params']:.2f}x / {them['x_macs']:.2f}x / {them['x_faster']:.2f}x" if them else "")
        lines.append(f"| {names[r['role']]} | {w} | {r['method'] or ''} |{_cells(axes, r)} {r['params']:,.0f} "
                     f"| {r['macs']:,.0f} | "
                     f"{r['latency_ms_b1_cpu']:.3f} | {ratios} | {_diff(them['delta']) if them else ''} | "
                     f"{_diff(r['vs_no_kd']['delta']) if r.get('vs_no_kd') else ''} |")
    return lines


def sentences(report: dict) -> list[str]:
    """One sentence per comparison: the difference, its interval, and whether it is noise."""
    pct = int(report["confidence"] * 100)
    said = []

    def verdict(i: dict, what: str, than: str) -> str:
        if i["n"] == 0:
            return f"{what}: no seed finished both, so no comparison {than}."
        if i["low"] is None:
            return (f"{what}: {_num(i['mean'], True)} pp {than} on one seed; one seed gives no "
                    f"interval, so this says nothing yet (run more seeds).")
        span = f"{pct}% CI {_num(i['low'], True)} to {_num(i['high'], True)}, {i['n']} seeds"
        if i["low"] <= 0 <= i["high"]:
            return f"{what}: {_num(i['mean'], True)} pp {than} ({span}): within noise."
        side = "better" if i["mean"] > 0 else "worse"
        return f"{what}: {_num(i['mean'], True)} pp {than} ({span}): {side}, beyond noise."

    for r in report["students"]:
        if r["vs_normal"] is not None:
            said.append(verdict(r["vs_normal"], f"{r['method']} from the w = {_w(r['weight'])} teacher{_with(r)}",
                                "against the normal teacher's student"))
    for r in report["students"]:
        if r["weight"] == 0:
            said.append(verdict(r["vs_no_kd"], f"{r['method']} from the normal teacher{_with(r)}",
                                "against the no-KD student"))
    for r in report["students"]:
        what = f"{r['method']} from the w = {_w(r['weight'])} teacher{_with(r)}"
        for key, than in (("vs_normal", "against the normal teacher's student"),
                          ("vs_no_kd", "against the no-KD student")):
            if r[key] is not None and (words := _disagreement(r[key], r[f"{key}_median"], r["far"])):
                said.append(f"{what} {than}: {words}")
    for row, what in ([(r, f"the no-KD student{_with(r)}") for r in report["no_kd"]]
                      + [(t, f"the w = {_w(t['weight'])} teacher{_with(t)}") for t in report["teachers"]]
                      + [(r, f"{r['method']} from the w = {_w(r['weight'])} teacher{_with(r)}")
                         for r in report["students"]]):
        if row["far"]:
            seeds = ", ".join(f"seed {f['seed']} ({f['val_acc']:.2f}%)" for f in row["far"])
            said.append(f"{what}: {seeds} lie{'s' * (len(row['far']) == 1)} far from the other seeds (median "
                        f"{row['median']['median']:.2f}%): the mean {row['val_acc']['mean']:.2f}% counts "
                        f"{'it' if len(row['far']) == 1 else 'them'}, the median does not.")
    return said


def _disagreement(mean: dict, median: dict, far: list[dict]) -> str | None:
    """Words for a paired difference whose mean (t-interval) and median (rank interval) give
    different verdicts or lie more than ``OUTLIER_MIN_PP`` apart; None when they agree."""
    if mean["n"] < 2 or mean["low"] is None or median["low"] is None:
        return None
    t_noise = mean["low"] <= 0 <= mean["high"]
    r_noise = median["low"] <= 0 <= median["high"]
    gap = abs(mean["mean"] - median["median"])
    if t_noise == r_noise and (t_noise or (mean["mean"] > 0) == (median["median"] > 0)) and gap <= OUTLIER_MIN_PP:
        return None

    def said(noise: bool, centre: float) -> str:
        return "within noise" if noise else ("better" if centre > 0 else "worse") + ", beyond noise"
    why = " (seeds far from the others pull the mean: see below)" if far else ""
    # close values can still disagree: one interval holds 0 and the other does not
    how = f"lie {gap:.2f} pp apart" if gap > OUTLIER_MIN_PP else "give different verdicts"
    return (f"the mean ({_num(mean['mean'], True)} pp, {said(t_noise, mean['mean'])}) and the median "
            f"({_num(median['median'], True)} pp, {median['level']:.0%} rank interval {_num(median['low'], True)} "
            f"to {_num(median['high'], True)}, {said(r_noise, median['median'])}) {how}: "
            f"they disagree{why}.")
