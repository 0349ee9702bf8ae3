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
from collections.abc import Iterable

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # figures without pyplot: no window, no global state
from matplotlib.ticker import MaxNLocator
from scipy import stats

from ttkd.stages import teacher_kind as kind
from ttkd.studies.grid import Grid, Point

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values, their standard deviation and the ``CONFIDENCE`` interval
    of the mean; ``p`` is the two-sided p-value of "the mean is 0" (for differences).
    With one value the spread and the interval are NaN."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    p: float

    @property
    def within_noise(self) -> bool:
        return not (self.low > 0 or self.high < 0)


def interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """mean ± t_{(1+c)/2, n−1} · s / √n, with s the sample standard deviation (ddof 1)."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    se = std / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    if se == 0:  # every value equal: no spread, the mean is exact
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return Interval(n, mean, std, mean - half, mean + half, p)


def paired(a: dict[int, float], b: dict[int, float]) -> Interval:
    """The interval of mean(a − b) over the seeds both have (a paired t interval)."""
    common = sorted(set(a) & set(b))
    return interval(a[s] - b[s] for s in common)


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


def figures(report: dict) -> dict[str, Figure]:
    """``students_vs_weight.png``, ``teachers_vs_weight.png`` and ``kd_curves.png``."""
    found = {"students_vs_weight.png": _students_figure(report),
             "teachers_vs_weight.png": _teachers_figure(report),
             "kd_curves.png": _curves_figure(report)}
    if report.get("costs"):
        found["accuracy_vs_latency.png"] = _latency_figure(report)
    return found


def _latency_figure(report: dict) -> Figure:
    """val_acc against CPU latency at batch 1 (log scale): one marker per model (role, w,
    method), error bars = standard deviation over seeds."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    marks = {"student": "s", "teacher": "^", "kd": "o"}
    styles = dict(zip(report["grid"]["weights"], _weight_styles(report["grid"]["weights"])))
    for r in report["costs"]:
        color = styles[r["weight"]]["color"] if r["weight"] is not None else "grey"
        label = {"student": "student, no KD", "teacher": f"teacher w = {r['weight']:g}",
                 "kd": f"{r['method']} student, w = {r['weight']:g}"}[r["role"]] if r["role"] != "student" else \
            "student, no KD"
        ax.errorbar(r["latency_ms_b1_cpu"], r["val_acc"]["mean"], xerr=r["latency_std"],
                    yerr=r["val_acc"]["std"] or 0.0, fmt=marks[r["role"]], color=color, label=label, capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("ms per image at batch 1 (CPU, 1 thread; log scale)")
    ax.set_ylabel("val_acc (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title("accuracy against latency, mean ± std over seeds")
    return fig


def _weight_axis(ax, weights: list[float]) -> None:
    ax.set_xticks(range(len(weights)), [f"{w:g}\n{kind(w)}" for w in weights])
    ax.set_xlabel("teacher weight w (evenly spaced; < 0 nasty, 0 normal, > 0 trained)")
    ax.grid(alpha=0.3)


def _band(ax, x, rows: list[dict], label: str, **style) -> None:
    """A line of means with its interval as a band, cut at 0 and 100 (percentages)."""
    mean = [r["mean"] if r["n"] else np.nan for r in rows]
    ax.plot(x, mean, marker="o", label=label, **style)
    low = [max(r["low"], 0.0) if r["low"] is not None else np.nan for r in rows]
    high = [min(r["high"], 100.0) if r["high"] is not None else np.nan for r in rows]
    ax.fill_between(x, low, high, alpha=0.2, color=ax.lines[-1].get_color())


def _weight_styles(weights: list[float]) -> list[dict]:
    """Nasty teachers in reds, trained ones in blues (darker = larger |w|), the normal one
    a dashed black line."""
    nasty = sorted((w for w in weights if w < 0), reverse=True)
    trained = sorted(w for w in weights if w > 0)

    def shade(cmap, ws, w):
        return {"color": matplotlib.colormaps[cmap](0.4 + 0.45 * (ws.index(w) + 1) / len(ws))}
    return [shade("Reds", nasty, w) if w < 0 else shade("Blues", trained, w) if w > 0
            else {"color": "black", "linestyle": "--"} for w in weights]


def _students_figure(report: dict) -> Figure:
    weights = report["grid"]["weights"]
    seeds = len(report["grid"]["seeds"])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(weights))
    for method in report["grid"]["methods"]:
        rows = [r["val_acc"] for r in report["students"] if r["method"] == method]
        _band(ax, x, rows, f"KD student ({method})")
    base = report["no_kd"]["val_acc"]
    if base["n"]:
        ax.axhline(base["mean"], color="grey", linestyle="--", label="no-KD student")
        if base["low"] is not None:
            ax.axhspan(base["low"], base["high"], color="grey", alpha=0.12)
    _weight_axis(ax, weights)
    ax.set_ylabel("student val_acc (%)")
    ax.set_title(f"Students distilled from each teacher: mean over {seeds} seed{'s' * (seeds > 1)}, "
                 f"band = {int(report['confidence'] * 100)}% CI", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _teachers_figure(report: dict) -> Figure:
    weights = report["grid"]["weights"]
    x = np.arange(len(weights))
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    _band(left, x, [t["val_acc"] for t in report["teachers"]], "teacher", color="black")
    _weight_axis(left, weights)
    left.set_ylabel("teacher val_acc (%)")
    left.set_title("The teachers' own accuracy", fontsize=10)
    _band(right, x, [t["agreement"] for t in report["teachers"]],
          "teacher with the frozen student it trained against", color="black")
    for method in report["grid"]["methods"]:
        rows = [r["agreement"] for r in report["students"] if r["method"] == method]
        _band(right, x, rows, f"KD student ({method}) with its teacher")
    _weight_axis(right, weights)
    right.set_ylabel("top-1 agreement (%)")
    right.set_title("Teacher–student agreement on the validation split", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(f"mean over seeds, band = {int(report['confidence'] * 100)}% CI", fontsize=9)
    return fig


def _curves_figure(report: dict) -> Figure:
    """Per method a row: every epoch, and the second half zoomed in, where the students of
    the different teachers separate (or do not)."""
    methods = report["grid"]["methods"]
    fig = Figure(figsize=(11, 4 * len(methods)), layout="constrained")
    axes = fig.subplots(len(methods), 2, squeeze=False)
    styles = _weight_styles(report["grid"]["weights"])
    for (whole, zoom), method in zip(axes, methods):
        for style, r in zip(styles, (r for r in report["students"] if r["method"] == method)):
            c = r["curve"]
            if c is None:
                continue
            half = len(c["epochs"]) // 2
            for ax, first in ((whole, 0), (zoom, half)):
                epochs = c["epochs"][first:]
                ax.plot(epochs, c["mean"][first:], label=f"w = {_w(r['weight'])}, {c['n']} seeds", **style)
                if c["n"] > 1:
                    ax.fill_between(epochs, np.clip(c["low"][first:], 0, 100),
                                    np.clip(c["high"][first:], 0, 100), color=style["color"], alpha=0.12)
        whole.set_title(f"{method} students, by their teacher's w: every epoch", fontsize=10)
        zoom.set_title(f"{method} students: the second half, zoomed in", fontsize=10)
        for ax in (whole, zoom):
            ax.set_xlabel("epoch")
            ax.set_ylabel("val_acc (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        whole.legend(fontsize=8)
    fig.suptitle(f"Validation accuracy per epoch: mean over seeds, band = "
                 f"{int(report['confidence'] * 100)}% CI", fontsize=9)
    return fig
