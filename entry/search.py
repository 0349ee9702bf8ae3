"""`mlflow run . -e search`: Optuna's trials of a KD student (teacher=) or of the student alone."""

from entry.options import command, launched, run, stage_options
from ttkd import config, presets
from ttkd.studies import search


@command("search")
@stage_options(config.STAGE_PARAMS["search"])
def main(preset, **given):
    """Each trial trains the configuration the sampler asks for, evaluated on a holdout of the
    training split; prints and logs the trials and the best configuration."""
    cfg = presets.resolve("search", given, preset)

    def body() -> None:
        line = lambda text: print(text, flush=True)  # noqa: E731
        if cfg.values["resume"]:
            print(search.resume_search(cfg.values["resume"], cfg, print_line=line,
                                       jobs=given["jobs"] and cfg.values["jobs"],
                                       threads=given["threads"] and cfg.values["threads"],
                                       **{k: given[k] and cfg.values[k] for k in config.CLUSTER}))
        else:
            print(search.search(**cfg.stage_kwargs(), print_line=line))
    launched("search", cfg, body)

if __name__ == "__main__":
    run(main)
