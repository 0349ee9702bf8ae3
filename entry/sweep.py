"""`mlflow run . -e sweep`: seeds x teacher weights x KD methods, with paired statistics."""

from entry.options import command, launched, run, stage_options
from ttkd import config, distributed, presets, studies


@command("sweep")
@stage_options(config.STAGE_PARAMS["sweep"])
def main(preset, **given):
    """Per seed a baseline student; per (seed, w) a teacher against it; per (seed, w, method)
    a KD student from that teacher. Prints and logs the paired report, then promotes."""
    cfg = presets.resolve("sweep", given, preset)

    def body() -> None:
        if cfg.values["resume"]:
            several = distributed.world() is not None  # points one at a time, whatever the sweep had
            print(studies.resume_grid("sweep", cfg.values["resume"], cfg,
                                      jobs=1 if several else given["jobs"] and cfg.values["jobs"],
                                      threads=given["threads"] and cfg.values["threads"],
                                      **{k: given[k] and cfg.values[k] for k in config.CLUSTER}))
        else:
            print(studies.sweep(**cfg.stage_kwargs(), print_line=lambda line: print(line, flush=True)))
    launched("sweep", cfg, body)

if __name__ == "__main__":
    run(main)
