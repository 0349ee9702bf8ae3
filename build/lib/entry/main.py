"""`mlflow run .`: the whole Trained-Teacher study on one data set, or any preset."""

from entry import baseline, distill, teach
from entry.options import command, launched, run, stage_options
from ttkd import config, presets, studies
from ttkd.errors import TTKDError

ALL_PARAMS = tuple(dict.fromkeys(n for stage in ("baseline", "teach", "distill", "main")
                                 for n in config.STAGE_PARAMS[stage]))
SINGLE = {"baseline": baseline.main, "teach": teach.main, "distill": distill.main}


@command("main")
@stage_options(ALL_PARAMS)
def main(preset, **given):
    """Baseline student, normal and trained teacher, a KD student from each, compared.
    With a preset for a single stage, run that stage instead."""
    stage = presets.preset_stage(preset) or "main"
    if stage == "sweep":
        raise TTKDError(f"preset {preset!r} is for the sweep; run it with -e sweep")
    taken = set(config.STAGE_PARAMS[stage])
    stray = sorted(k for k, v in given.items() if v not in (None, "") and k not in taken)
    if stray:
        raise TTKDError(f"the {stage} stage does not take {', '.join(stray)}; "
                               f"it takes: {', '.join(sorted(taken))}")
    if stage != "main":
        SINGLE[stage].callback(preset=preset, **{k: given[k] for k in taken})
        return
    cfg = presets.resolve("main", given, preset)
    launched("main", cfg, lambda: print(studies.resume_grid("main", cfg.values["resume"], cfg)
                                        if cfg.values["resume"] else studies.study(**cfg.stage_kwargs())))


if __name__ == "__main__":
    run(main)
