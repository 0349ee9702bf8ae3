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

import numpy as np

from ttkd.stages import teacher_kind as kind
from ttkd.studies.plan import Grid, Point
from ttkd.studies.report.figures import figures  # noqa: F401 (part of the report's interface)
from ttkd.studies.report.statistics import CONFIDENCE, Interval, interval, paired  # noqa: F401


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
    """The report as plain data (``report.json``)."""
    def acc(role, w=None, m=None, field="val_acc"):
        found = {s: getattr(values[p], field) for s in grid.seeds
                 if (p := Point(role, s, w, m)) in values and getattr(values[p], field) is not None}
        return found

    no_kd = acc("student")
    students = []
    for method in grid.methods:
        normal = acc("kd", 0.0, method)
        for w in grid.weights:
            mine = acc("kd", w, method)
            students.append({
                "weight": w, "kind": kind(w), "method": method, "val_acc": _dict(interval(mine.values())),
                "vs_normal": _dict(paired(mine, normal)) if w != 0 else None,
                "vs_no_kd": _dict(paired(mine, no_kd)),
                "agreement": _dict(interval(acc("kd", w, method, "agreement").values())),
                "per_seed": mine,
                "curve": _curve([values[Point("kd", s, w, method)].curve for s in mine]),
            })
    teachers = [{"weight": w, "kind": kind(w), "val_acc": _dict(interval(acc("teacher", w).values())),
                 "agreement": _dict(interval(acc("teacher", w, field="agreement").values())),
                 "per_seed": acc("teacher", w)} for w in grid.weights]
    return {
        "costs": _costs(grid, values, acc) if values and all(v.cost for v in values.values()) else [],
        "grid": dataclasses.asdict(grid), "confidence": CONFIDENCE,
        "no_kd": {"val_acc": _dict(interval(no_kd.values())), "per_seed": no_kd},
        "students": students, "teachers": teachers,
        "failed": [{"point": p.key, "error": e} for p, e in failed.items()],
        "points": [{"point": p.key, "role": p.role, "seed": p.seed, "weight": p.weight, "method": p.method,
                    "val_acc": v.val_acc, "agreement": v.agreement, "model": v.model, "run_id": v.run_id}
                   for p, v in values.items()],
    }


def _costs(grid: Grid, values: dict[Point, PointValues], acc) -> list[dict]:
    """Per model (the no-KD student, each teacher, each KD student): its cost, mean over
    seeds; a KD student's also as ratios to its teacher's and the no-KD student's (x fewer
    parameters and MACs, x faster at batch 1) with its paired Δ val_acc to each."""
    def cost(role, w=None, m=None):
        found = [values[p].cost for s in grid.seeds if (p := Point(role, s, w, m)) in values]
        return {k: float(np.mean([c[k] for c in found])) for k in ("params", "macs", "latency_ms_b1_cpu")} | {
            "latency_std": float(np.std([c["latency_ms_b1_cpu"] for c in found])), "n": len(found)} if found else None

    def versus(mine: dict, theirs: dict, delta: Interval) -> dict:
        return {"x_params": theirs["params"] / mine["params"], "x_macs": theirs["macs"] / mine["macs"],
                "x_faster": theirs["latency_ms_b1_cpu"] / mine["latency_ms_b1_cpu"], "delta": _dict(delta)}
    no_kd = cost("student")
    rows = [{"role": "student", "weight": None, "method": None, "val_acc": _dict(interval(acc("student").values())),
             **(no_kd or {})}]
    for w in grid.weights:
        teacher = cost("teacher", w)
        rows.append({"role": "teacher", "weight": w, "method": None,
                     "val_acc": _dict(interval(acc("teacher", w).values())), **(teacher or {})})
        for m in grid.methods:
            mine = cost("kd", w, m)
            if mine is None:
                continue
            rows.append({"role": "kd", "weight": w, "method": m, "val_acc": _dict(interval(acc("kd", w, m).values())),
                         **mine,
                         "vs_teacher": versus(mine, teacher, paired(acc("kd", w, m), acc("teacher", w)))
                         if teacher else None,
                         "vs_no_kd": versus(mine, no_kd, paired(acc("kd", w, m), acc("student"))) if no_kd else None})
    return [r for r in rows if "params" in r]


def headline_metrics(report: dict) -> dict[str, float]:
    """The report's means as metrics of the parent run: ``no_kd.val_acc``,
    ``METHOD.wW.val_acc`` and ``METHOD.wW.vs_w0`` (the paired difference)."""
    found = {"no_kd.val_acc": report["no_kd"]["val_acc"]["mean"]}
    for r in report["students"]:
        found[f"{r['method']}.w{r['weight']:g}.val_acc"] = r["val_acc"]["mean"]
        if r["vs_normal"] is not None:
            found[f"{r['method']}.w{r['weight']:g}.vs_w0"] = r["vs_normal"]["mean"]
    for t in report["teachers"]:
        found[f"teacher.w{t['weight']:g}.val_acc"] = t["val_acc"]["mean"]
    return {k: v for k, v in found.items() if v is not None and not math.isnan(v)}


def _dict(i: Interval) -> dict:
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


def _w(w: float) -> str:
    return f"{w:g} ({kind(w)})"


def markdown(report: dict) -> str:
    """The tables and, under them, in words, which differences are within noise."""
    seeds = len(report["grid"]["seeds"])
    pct = int(report["confidence"] * 100)
    lines = [f"## Students: val_acc (%) over {seeds} seed{'s' * (seeds > 1)}",
             "",
             f"mean ± std over seeds; Δ: paired difference per seed (pp), mean [{pct}% CI]",
             "",
             "| teacher w | method | seeds | student val_acc | Δ vs student of the w = 0 teacher "
             "| Δ vs no-KD student | agreement with teacher (%) |",
             "|---|---|---:|---:|---:|---:|---:|",
             f"| (no KD) | | {report['no_kd']['val_acc']['n']} | {_mean_std(report['no_kd']['val_acc'])} "
             f"| | (reference) | |"]
    for r in report["students"]:
        lines.append(f"| {_w(r['weight'])} | {r['method']} | {r['val_acc']['n']} | {_mean_std(r['val_acc'])} "
                     f"| {_diff(r['vs_normal'])} | {_diff(r['vs_no_kd'])} | {_mean_std(r['agreement'])} |")
    lines += ["", "## Teachers", "",
              "| w | seeds | teacher val_acc (%) | agreement with its frozen student (%) |",
              "|---|---:|---:|---:|"]
    for t in report["teachers"]:
        lines.append(f"| {_w(t['weight'])} | {t['val_acc']['n']} | {_mean_std(t['val_acc'])} "
                     f"| {_mean_std(t['agreement'])} |")
    lines += _cost_lines(report)
    lines += ["", "## In words", ""] + [f"- {s}" for s in sentences(report)]
    if report["failed"]:
        lines += ["", "## Points that did not finish", ""]
        lines += [f"- {f['point']}: {f['error']}" for f in report["failed"]]
    return "\n".join(lines) + "\n"


def _cost_lines(report: dict) -> list[str]:
    """The cost table: what each model costs to run, and each KD student against its teacher."""
    if not report.get("costs"):
        return []
    pct = int(report["confidence"] * 100)
    lines = ["", "## What the models cost", "",
             "measured on the served network, CPU, 1 thread; a KD student against its teacher: x fewer "
             f"parameters, MACs, x faster at batch 1, and its paired Δ val_acc (pp, mean [{pct}% CI])", "",
             "| model | w | method | parameters | MACs per image | ms per image (batch 1) | vs its teacher: "
             "params / MACs / speed | Δ val_acc vs teacher | Δ val_acc vs no-KD student |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    names = {"student": "student, no KD", "teacher": "teacher", "kd": "KD student"}
    for r in report["costs"]:
        w = _w(r["weight"]) if r["weight"] is not None else ""
        them = r.get("vs_teacher")
        ratios = (f"{them['x_params']:.2f}x / {them['x_macs']:.2f}x / {them['x_faster']:.2f}x" if them else "")
        lines.append(f"| {names[r['role']]} | {w} | {r['method'] or ''} | {r['params']:,.0f} | {r['macs']:,.0f} | "
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
            said.append(verdict(r["vs_normal"], f"{r['method']} from the w = {_w(r['weight'])} teacher",
                                "against the normal teacher's student"))
    for r in report["students"]:
        if r["weight"] == 0:
            said.append(verdict(r["vs_no_kd"], f"{r['method']} from the normal teacher",
                                "against the no-KD student"))
    return said
