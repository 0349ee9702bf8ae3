"""A sweep's figures, drawn from its report (a dict): students, teachers, training curves and
the accuracy each student buys for its latency. matplotlib without pyplot: no window, no
global state."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ttkd.parsing import show
from ttkd.stages import teacher_kind as kind


def figures(report: dict) -> dict[str, Figure]:
    """``students_vs_weight.png``, ``teachers_vs_weight.png``, ``kd_curves.png``, with costs
    ``accuracy_vs_latency.png``, and for each numeric axis ``students_vs_NAME.png``."""
    found = {"students_vs_weight.png": _students_figure(report),
             "teachers_vs_weight.png": _teachers_figure(report),
             "kd_curves.png": _curves_figure(report)}
    if report.get("costs"):
        found["accuracy_vs_latency.png"] = _latency_figure(report)
    for name, values in report["grid"]["axes"]:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            found[f"students_vs_{name}.png"] = _students_along(report, name)
    return found


def _others(row: dict, but: str | None = None) -> str:
    """A row's axis values but ``but``, for a legend: ``, kd_temperature=2``."""
    return "".join(f", {n}={show(v)}" for n, v in row["values"].items() if n != but)


def _series(rows: list[dict], label) -> dict[str, list[dict]]:
    """``rows`` grouped by ``label(row)``, in their order."""
    found: dict[str, list[dict]] = {}
    for r in rows:
        found.setdefault(label(r), []).append(r)
    return found


def _students_along(report: dict, name: str) -> Figure:
    """Student val_acc against the values of numeric axis ``name`` (to scale): a line per
    method, teacher weight and value of the other axes, with its band."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    rows = [r for r in report["students"] if name in r["values"]]
    for label, line in _series(rows, lambda r: f"{r['method']}, w = {r['weight']:g}{_others(r, name)}").items():
        line = sorted(line, key=lambda r: r["values"][name])
        _band(ax, [r["values"][name] for r in line], [r["val_acc"] for r in line], label)
    for r in report["no_kd"]:
        if name in r["values"]:
            continue
        if r["val_acc"]["n"]:
            ax.axhline(r["val_acc"]["mean"], color="grey", linestyle="--", label=f"no-KD student{_others(r)}")
    if any(name in r["values"] for r in report["no_kd"]):
        line = sorted((r for r in report["no_kd"] if name in r["values"]), key=lambda r: r["values"][name])
        _band(ax, [r["values"][name] for r in line], [r["val_acc"] for r in line], "no-KD student",
              color="grey", linestyle="--")
    ax.set_xlabel(name)
    ax.set_ylabel("student val_acc (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"Students against {name}: mean over seeds, band = {int(report['confidence'] * 100)}% CI",
                 fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _latency_figure(report: dict) -> Figure:
    """val_acc against CPU latency at batch 1 (log scale): one marker per model (role, w,
    method), error bars = standard deviation over seeds."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    marks = {"student": "s", "teacher": "^", "kd": "o"}
    styles = dict(zip(report["grid"]["weights"], _weight_styles(report["grid"]["weights"])))
    for r in report["costs"]:
        color = styles[r["weight"]]["color"] if r["weight"] is not None else "grey"
        label = ("student, no KD" if r["role"] == "student" else f"teacher w = {r['weight']:g}"
                 if r["role"] == "teacher" else f"{r['method']} student, w = {r['weight']:g}") + _others(r)
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
    for label, line in _series(report["students"], lambda r: f"KD student ({r['method']}{_others(r)})").items():
        _band(ax, [weights.index(r["weight"]) for r in line], [r["val_acc"] for r in line], label)
    for r in report["no_kd"]:
        base = r["val_acc"]
        if base["n"]:
            ax.axhline(base["mean"], color="grey", linestyle="--", label=f"no-KD student{_others(r)}")
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
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    teachers = _series(report["teachers"], lambda t: _others(t).lstrip(", "))
    for label, line in teachers.items():
        x = [weights.index(t["weight"]) for t in line]
        style = {"color": "black"} if len(teachers) == 1 else {}
        _band(left, x, [t["val_acc"] for t in line], f"teacher{f' ({label})' if label else ''}", **style)
        _band(right, x, [t["agreement"] for t in line], "teacher with the frozen student it trained against"
              + (f" ({label})" if label else ""), **style)
    _weight_axis(left, weights)
    left.set_ylabel("teacher val_acc (%)")
    left.set_title("The teachers' own accuracy", fontsize=10)
    for label, line in _series(report["students"], lambda r: f"KD student ({r['method']}{_others(r)})").items():
        _band(right, [weights.index(r["weight"]) for r in line], [r["agreement"] for r in line],
              f"{label} with its teacher")
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
    styles = dict(zip(report["grid"]["weights"], _weight_styles(report["grid"]["weights"])))
    for (whole, zoom), method in zip(axes, methods):
        for r in (r for r in report["students"] if r["method"] == method):
            style = styles[r["weight"]] if not r["values"] else {"color": None}
            c = r["curve"]
            if c is None:
                continue
            half = len(c["epochs"]) // 2
            for ax, first in ((whole, 0), (zoom, half)):
                epochs = c["epochs"][first:]
                label = f"w = {r['weight']:g} ({kind(r['weight'])}){_others(r)}, {c['n']} seeds"
                ax.plot(epochs, c["mean"][first:], label=label, **style)
                if c["n"] > 1:
                    ax.fill_between(epochs, np.clip(c["low"][first:], 0, 100), np.clip(c["high"][first:], 0, 100),
                                    color=ax.lines[-1].get_color(), alpha=0.12)
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
