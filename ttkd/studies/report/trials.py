"""A search's report: the table of its trials, the line of its best configuration, and
Optuna's own matplotlib figures of its study. It reads the study and writes nothing."""

from __future__ import annotations

import collections
import logging
from typing import Any

from ttkd.parsing import show

log = logging.getLogger(__name__)  # shown by the entry points (entry/options.py)


def markdown(study, args: dict, names: list[str]) -> str:
    """The search in words (its trials by state, sampler, pruner, holdout; its best trial) and
    a table of its trials: state, holdout_acc, epochs trained and each parameter of ``names``."""
    done = study.get_trials(deepcopy=False)
    counts = collections.Counter(t.state.name.lower() for t in done)
    head = (f"search {args['name']}: {len(done)} trials ("
            + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("complete", "pruned", "fail"))
            + f"), {args['sampler']} sampler, pruner {args['prune']}, evaluated on a holdout of "
            f"{args['holdout']:g} of the training split\n")
    if any(t.state.name == "COMPLETE" for t in done):
        best = study.best_trial
        config = " ".join(f"{n}={show(v)}" for n, v in best.params.items())
        head += f"best: trial {best.number}, holdout_acc {best.value:.2f}%: {config}\n"
    else:
        head += "no trial completed: nothing to choose\n"
    lines = [f"| trial | state | holdout_acc (%) | epochs | {' | '.join(names)} |",
             "|---:|---|---:|---:|" + "---|" * len(names)]
    for t in done:
        value = f"{t.value:.2f}" if t.value is not None else ""
        lines.append(f"| {t.number} | {t.state.name} | {value} | {max(t.intermediate_values, default='')} | "
                     + " | ".join(show(t.params[n]) if n in t.params else "" for n in names) + " |")
    return head + "\n" + "\n".join(lines) + "\n"


def figures(study) -> dict[str, Any]:
    """Optuna's own matplotlib figures of the study: the optimisation history, each trial's
    holdout accuracy by epoch, and the parameters' importances (with two completed trials or
    more, and more than one parameter that varied)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    found = {"optimization_history.png": plots.plot_optimization_history,
             "intermediate_values.png": plots.plot_intermediate_values,
             "param_importances.png": plots.plot_param_importances}
    made = {}
    for file, plot in found.items():
        try:
            made[file] = plot(study).figure
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few trials for this figure
            log.info(f"{file}: not drawn ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    return made
