"""Training speed and accuracy: ttkd's engine against a re-creation of the seed's loop.

    python -m benchmarks.bench                    # images per second, every stage
    python -m benchmarks.bench --accuracy         # validation accuracy, several seeds, three paths
    python -m benchmarks.bench --on-disk          # an image folder decoded into memory vs left on disk
    python -m benchmarks.bench --methods          # each KD method's cost per step, relative to kd
    python -m benchmarks.bench --methods-accuracy # each KD method's student, from normal and trained teachers
    python -m benchmarks.bench --compile-accuracy # digits: eager against compiled training, paired over seeds
    python -m benchmarks.bench --packing          # points per hour with K = 1, 2, 4, 8 points per device (Ray)
    python -m benchmarks.bench --scheduler        # the digits sweep on the local pool and on Ray, same run

Speed: for each stage (baseline: the student alone; teach: the teacher beside the frozen
student; distill: the student beside the frozen teacher) it measures in this one process,
on the same models, batch size and CIFAR-shaped random data:

    seed     the seed's loop: PIL images through per-sample torchvision transforms
             (random crop 32/4, flip, to-tensor, normalise) in a DataLoader with 4 workers,
             float32, the partner under no_grad, ``.item()`` and a numpy accuracy every step
    ttkd eager  ``ttkd.engine.fit`` (its second epoch), in the precision amp chose, not compiled
    ttkd     the same, as configured: amp and compile as a 240-epoch CIFAR stage decides them
             (``choose_step``; default auto)
    compute  forward + backward of the same network(s) on one batch already in memory,
             in ttkd's precision, eager and through ``torch.compile``: the ceiling for any
             data pipeline

The paths take turns, ``--repeat`` rounds per stage (a slow spell of a shared machine
then hits them all), and it prints the median images per second, ttkd/seed (with its
range over the rounds), ttkd over the faster compute path and each path's peak memory
(resident set size on the CPU, allocated memory on a GPU).

Accuracy: the digits study's five networks trained by ttkd with bf16 on, with it off, and
by the seed's DataLoader loop, over several seeds; prints mean ± standard deviation.

Packing: K baseline points at once on this machine's device through the sweep's Ray
backend (``cluster=local``), each declaring 1/K of a GPU (on CPU: 1/K of the cores, with
max(1, cores/K) threads), ``--rounds`` x K points per K in a store of their own; points per
hour from the wall time of all of them, Ray's start excluded.

Scheduler: the digits sweep (``--seeds`` seeds, default stages) with ``jobs=2`` on the local
pool and with ``cluster=local``, taking turns, wall time each, Ray's start included.

Methods: the distill step of every KD method in ``ttkd.kd`` through ``ttkd.engine.fit``,
in rounds taking turns, as images per second and relative to kd; and, over several
seeds on digits, the student each method distils from a normal and a trained teacher: the
digits sweep itself (``ttkd.studies.sweep``, jobs=2), its table read from the sweep's report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ttkd import data as datasets
from ttkd import kd, models
from ttkd.build import build_method
from ttkd.choice import choose_step
from ttkd.config import PARAMS, TrainConfig
from ttkd.engine import accuracy, fit, predict, seed_everything
from ttkd.step import Objective, Step, bf16_supported, compiled_step, device_name, frozen, resolve_device

STAGES = ("baseline", "teach", "distill")


# --- the seed's loop ------------------------------------------------------------------------

class SeedStyleDataset(torch.utils.data.Dataset):
    """Images kept as HWC uint8 arrays, turned into PIL images and transformed one at a
    time, as torchvision's CIFAR10 does for the seed."""

    def __init__(self, data: datasets.ImageData, split: str, augment: bool):
        import torchvision.transforms as T

        x, self.y = (data.train_x, data.train_y) if split == "train" else (data.val_x, data.val_y)
        self.x = x.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        side = data.image_shape[-1]
        steps = [T.RandomCrop(side, padding=data.crop_padding), T.RandomHorizontalFlip()] if augment else []
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(data.mean, data.std)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        image = self.x[i][:, :, 0] if self.x.shape[-1] == 1 else self.x[i]
        return self.transform(Image.fromarray(image)), int(self.y[i])


def seed_loader(data, split, batch_size, seed, workers=4):
    dataset = SeedStyleDataset(data, split, augment=split == "train" and bool(data.augment))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=split == "train",
                                       num_workers=workers, generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=workers > 0)


def seed_style_epoch(model, partner, loader, method, optimizer, device, max_images=None) -> float:
    """One epoch of the seed's loop; returns training images per second."""
    model.train()
    seen, started = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 1:  # the first batch pays for the workers' start
            started, seen = time.perf_counter(), 0
        x, y = x.to(device), y.to(device)
        out = model(x)
        partner_out = None
        if partner is not None:
            with torch.no_grad():
                partner_out = partner(x)
        loss = method(kd.Batch(logits=out, labels=y, epoch=1, partner_logits=partner_out))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the seed's running average reads the loss every step...
        np.mean(np.argmax(out.data.cpu().numpy(), axis=1) == y.cpu().numpy())  # ...and the accuracy
        seen += len(y)
        if max_images and seen >= max_images:
            break
    return seen / (time.perf_counter() - started)


# --- speed ----------------------------------------------------------------------------------

def make_method(name: str, model, partner, data, role: str = "distill", **params):
    """The ``ttkd.kd`` method ``name`` for ``model`` beside ``partner``, with the
    defaults of ``ttkd.config`` for what ``params`` does not set."""
    values = {n: params.get(n, PARAMS[n].default) for n in kd.get(name, role).params}
    return build_method(name, role, data, model, partner, values)


def stage_setup(stage, student, teacher, data, device, method="kd"):
    """(trained network, frozen partner or None, method) for ``stage``; the partner is
    ttkd's own class, as a stage rebuilds it from the registered weights."""
    build = lambda arch: models.build(arch, data.num_classes, data.in_channels,  # noqa: E731
                                      image_size=data.image_shape[-1])
    if stage == "baseline":
        model = build(student)
        return model.to(device), None, make_method("ce", model, None, data, "baseline")
    partner = build(student if stage == "teach" else teacher).eval()
    model = build(teacher if stage == "teach" else student)
    if stage == "teach":
        objective = make_method("teach", model, partner, data, "teach", weight=0.005, temperature=4.0)
    else:
        objective = make_method(method, model, partner, data)
    return model.to(device), partner.to(device), objective


class PeakMemory:
    """Peak memory of the block, in MiB: resident set (Linux) or CUDA allocations."""

    def __init__(self, device):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS
            except OSError:
                self.device = None  # no way to reset the peak here: report nothing
        return self

    def __exit__(self, *exc):
        if self.device is None:
            return False
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif Path("/proc/self/status").exists():
            hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")]
            self.mib = int(hwm[0].split()[1]) / 1024
        return False


def measure_seed(stage, args, data, device):
    torch.manual_seed(0)
    model, partner, method = stage_setup(stage, args.student, args.teacher, data, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = seed_loader(data, "train", args.batch_size, 0, args.workers)
    with PeakMemory(device) as mem:
        seed_style_epoch(model, partner, loader, method, optimizer, device, max_images=args.batch_size * 3)
        rate = seed_style_epoch(model, partner, loader, method, optimizer, device, args.images)
    return rate, mem.mib


# what amp=auto and compile=auto decide for: a stage of the literature's length (240 epochs
# of CIFAR's 50,000 training images), not the short measurement itself
STAGE_EPOCHS, STAGE_IMAGES = 240, 50_000


def ttkd_choice(stage, args, data, device):
    """How ``fit`` runs ``stage`` with ``args.amp`` and ``args.compile``, decided for a
    240-epoch CIFAR stage (measured once, then cached)."""
    torch.manual_seed(0)
    model, partner, method = stage_setup(stage, args.student, args.teacher, data, device)
    config = TrainConfig(batch_size=args.batch_size, amp=args.amp, compile=args.compile, device=str(device))
    return choose_step(model, data, method, config, partner,
                       steps=STAGE_EPOCHS * math.ceil(STAGE_IMAGES / args.batch_size))


def measure_ttkd(stage, args, data, device, method="kd", compiled=True):
    """``fit``'s second epoch: as configured (``compiled``), or eager in the same precision."""
    choice = ttkd_choice(stage, args, data, device)
    torch.manual_seed(0)
    model, partner, objective = stage_setup(stage, args.student, args.teacher, data, device, method)
    config = TrainConfig(epochs=2, batch_size=args.batch_size, lr=0.01, amp=args.amp, compile=args.compile,
                         device=str(device))
    step = choice.step if compiled else Step(choice.bf16)
    with PeakMemory(device) as mem:
        history = fit(model, data, objective, config, partner=partner, step=step)
    return history[-1].throughput, mem.mib


def measure_compute(stage, args, data, device, mode=None):
    """Forward and backward alone on one batch in memory, in ttkd's precision; with
    ``mode``, the same step through ``torch.compile``."""
    fast = ttkd_choice(stage, args, data, device).bf16
    torch.manual_seed(0)
    model, partner, method = stage_setup(stage, args.student, args.teacher, data, device)
    model.to(memory_format=torch.channels_last if fast else torch.contiguous_format)
    if partner is not None:
        partner = frozen(partner, fast)  # as fit runs it
    x, y = next(datasets.batches(data, "train", args.batch_size, channels_last=fast,
                                 generator=torch.Generator().manual_seed(0)))
    model.train()
    objective, partner_run = compiled_step(Objective(model, method, fast, features=False), partner, fast,
                                           False, mode)

    def step():
        objective(x, y, epoch=1, **(partner_run(x) if partner is not None else {}))["loss"].backward()
        model.zero_grad(set_to_none=True)

    steps = max(3, args.images // args.batch_size)
    with PeakMemory(device) as mem:
        for _ in range(3):
            step()
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
    return steps * len(y) / (time.perf_counter() - started), mem.mib


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


MEASURES = (("seed", measure_seed), ("ttkd_eager", functools.partial(measure_ttkd, compiled=False)),
            ("ttkd", measure_ttkd), ("compute", measure_compute),
            ("compute_compiled", functools.partial(measure_compute, mode="default")))


def speed(args) -> list[dict]:
    """Measure every stage ``args.repeat`` times, the paths taking turns so that a slow
    spell of the machine hits all of them; report medians and the ratios' range. ttkd is
    compared with the faster of the two compute paths."""
    device = resolve_device(args.device)
    full = datasets.load(args.dataset)
    n = args.images + 4 * args.batch_size  # the measured epoch plus the seed loop's warm-up
    data = dataclasses.replace(full, train_x=full.train_x[:n], train_y=full.train_y[:n],
                               val_x=full.val_x[:args.batch_size], val_y=full.val_y[:args.batch_size])
    rows = []
    for stage in args.stages:
        c = ttkd_choice(stage, args, data.to(device), device)
        print(f"# {stage}: ttkd trains in {'bf16' if c.bf16 else 'float32'} ({c.reason}"
              + "".join(f", {k} {v:,.0f} img/s" for k, v in sorted(c.rates.items()))
              + f"), compile {c.compile or 'off'} ({c.compile_reason})", file=sys.stderr)
        if c.compile_s is not None:
            rate = c.rates[f"{'bf16' if c.bf16 else 'float32'}+{c.compile or 'default'}"]
            stage_s = STAGE_EPOCHS * STAGE_IMAGES / rate
            print(f"# {stage}: compiling took {c.compile_s:.0f} s, {100 * c.compile_s / stage_s:.3f}% of a "
                  f"{STAGE_EPOCHS}-epoch CIFAR stage ({stage_s / 3600:.1f} h at {rate:,.0f} img/s)", file=sys.stderr)
        rates = {name: [] for name, _ in MEASURES}
        peak = dict.fromkeys(rates, 0.0)
        for _ in range(args.repeat):
            for name, measure in MEASURES:
                rate, mib = measure(stage, args, data if name == "seed" else data.to(device), device)
                rates[name].append(rate)
                peak[name] = max(peak[name], mib)
        compute = [max(a, b) for a, b in zip(rates["compute"], rates["compute_compiled"])]
        vs_seed = [t / s for t, s in zip(rates["ttkd"], rates["seed"])]
        of_compute = [t / c for t, c in zip(rates["ttkd"], compute)]
        rows.append(dict(stage=stage, **{k: statistics.median(v) for k, v in rates.items()},
                         vs_seed=statistics.median(vs_seed), vs_seed_range=(min(vs_seed), max(vs_seed)),
                         of_compute=statistics.median(of_compute),
                         seed_mib=peak["seed"], ttkd_mib=peak["ttkd"],
                         compute_mib=max(peak["compute"], peak["compute_compiled"])))
        print(_row(rows[-1]), flush=True)
    return rows


def _row(r) -> str:
    low, high = r["vs_seed_range"]
    return (f"| {r['stage']} | {r['seed']:,.0f} | {r['ttkd_eager']:,.0f} | {r['ttkd']:,.0f} | "
            f"{r['compute']:,.0f} | {r['compute_compiled']:,.0f} | {r['vs_seed']:.2f}x ({low:.2f}-{high:.2f}) | "
            f"{100 * r['of_compute']:.0f}% | "
            f"{r['seed_mib']:,.0f} / {r['ttkd_mib']:,.0f} / {r['compute_mib']:,.0f} |")


def on_disk(args) -> dict[str, float]:
    """ttkd's baseline stage on an image folder, decoded into memory and left on disk:
    images/s (median of ``args.repeat``). The folder holds the synthetic data's first
    ``args.images`` training and ``args.batch_size`` validation images as PNG files."""
    import tempfile

    from PIL import Image

    device = resolve_device(args.device)
    full = datasets.load(args.dataset)
    rates = {"in memory": [], "on disk": []}
    with tempfile.TemporaryDirectory() as root:
        for split, x, y in (("train", full.train_x[:args.images], full.train_y),
                            ("val", full.val_x[:args.batch_size], full.val_y)):
            for i, image in enumerate(x):
                folder = Path(root, split, f"class{int(y[i]):03d}")
                folder.mkdir(parents=True, exist_ok=True)
                pixels = image.permute(1, 2, 0).numpy()
                image = Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels)
                image.save(folder / f"{i}.png")
        for _ in range(args.repeat):
            for name, stream in (("in memory", False), ("on disk", True)):
                data = datasets.load("imagefolder", root, stream=stream).to(device)
                rates[name].append(measure_ttkd("baseline", args, data, device)[0])
    return {k: statistics.median(v) for k, v in rates.items()}


# --- accuracy -------------------------------------------------------------------------------

def seed_style_fit(model, data, method, config, partner, device) -> float:
    """Train like the seed (DataLoader of PIL images, float32) with ttkd's optimiser and
    schedule; returns the final validation accuracy (percent)."""
    from ttkd.engine import make_optimizer

    optimizer, scheduler = make_optimizer(list(model.parameters()), config)
    loader = seed_loader(data, "train", config.batch_size, config.seed, workers=2)
    for _ in range(config.epochs):
        seed_style_epoch(model, partner, loader, method, optimizer, device)
        scheduler.step()
    model.eval()
    return accuracy(predict(model, data.to(device), config.batch_size), data.val_y.to(device))


def study_accuracies(path: str, seed: int, args) -> dict[str, float]:
    """The digits study's five networks, trained along ``path`` (bf16 / fp32 / seed-loop)."""
    device = resolve_device(args.device)
    data = datasets.load("digits")
    on_device = data.to(device)
    config = TrainConfig(seed=seed, amp=path == "bf16", device=str(device))

    def train(arch, method, role, partner=None, **params):
        seed_everything(seed)
        model = models.build(arch, data.num_classes, data.in_channels, image_size=8)
        objective = make_method(method, model, partner, data, role, **params)
        model.to(device)
        if path == "seed-loop":
            acc = seed_style_fit(model, data, objective, config, partner, device)
        else:
            acc = fit(model, on_device, objective, config, partner=partner, step=Step(path == "bf16"))[-1].val_acc
        return model.eval(), acc

    result = {}
    student, result["student"] = train("mlp", "ce", "baseline")
    teachers = {}
    for kind, w in (("normal", 0.0), ("trained", 0.005)):
        teachers[kind], result[f"teacher_{kind}"] = train("cnn", "teach", "teach", student, weight=w,
                                                          temperature=4.0)
    for kind in ("normal", "trained"):
        _, result[f"kd_{kind}"] = train("mlp", "kd", "distill", teachers[kind])
    return result


def accuracy_table(args) -> str:
    paths = ("bf16", "fp32", "seed-loop")
    scores = {p: [study_accuracies(p, s, args) for s in range(args.seeds)] for p in paths}
    keys = ("student", "kd_normal", "kd_trained", "teacher_normal", "teacher_trained")
    lines = ["| model | " + " | ".join(paths) + " |", "|---|" + "---|" * len(paths)]
    for k in keys:
        cells = []
        for p in paths:
            values = [s[k] for s in scores[p]]
            cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_accuracy(args) -> str:
    """Over ``args.seeds`` seeds on digits: ``args.student`` trained from scratch eagerly and
    with its step compiled (float32, default parameters); the paired difference of val_acc
    with its 95% interval, by the sweep's statistics."""
    from ttkd.studies.report import interval, paired

    device = resolve_device(args.device)
    data = datasets.load("digits").to(device)
    acc = {False: {}, True: {}}
    for seed in range(args.seeds):
        for compiled in (False, True):
            seed_everything(seed)
            model = models.build(args.student, data.num_classes, data.in_channels, image_size=8).to(device)
            method = make_method("ce", model, None, data, "baseline")
            config = TrainConfig(seed=seed, amp=False, compile=compiled, device=str(device))
            acc[compiled][seed] = fit(model, data, method, config)[-1].val_acc
            print(f"seed {seed} {'compiled' if compiled else 'eager'}: {acc[compiled][seed]:.2f}",
                  file=sys.stderr, flush=True)
    d, e, c = paired(acc[True], acc[False]), interval(acc[False].values()), interval(acc[True].values())
    return (f"digits, {args.student}, {args.seeds} seeds, float32: eager {e.mean:.2f} ± {e.std:.2f}, compiled "
            f"{c.mean:.2f} ± {c.std:.2f}; compiled − eager {d.mean:+.2f} pp [95% CI {d.low:+.2f}, {d.high:+.2f}]")


def method_speed(args) -> list[tuple[str, float, float]]:
    """The distill stage's training images/s for every KD method, through ``fit`` (its
    second epoch), methods taking turns for ``args.repeat`` rounds; returns
    ``(method, median images/s, median ratio to kd in the same round)``."""
    device = resolve_device(args.device)
    full = datasets.load(args.dataset)
    data = dataclasses.replace(full, train_x=full.train_x[:args.images], train_y=full.train_y[:args.images],
                               val_x=full.val_x[:args.batch_size], val_y=full.val_y[:args.batch_size])
    data = data.to(device)
    rates = {m: [] for m in kd.names()}
    for _ in range(args.repeat):
        for method in rates:
            rates[method].append(measure_ttkd("distill", args, data, device, method)[0])
    return [(m, statistics.median(r), statistics.median([a / b for a, b in zip(rates["kd"], r)]))
            for m, r in rates.items()]


def method_accuracies(args) -> str:
    """Over ``args.seeds`` seeds on digits: a ``args.student`` baseline, a normal (w = 0)
    and a trained (w = 0.005) ``args.teacher`` against it, and a student distilled by every
    method from each teacher, all with the stages' default parameters; a markdown table
    of val_acc mean ± standard deviation. It is the digits sweep itself (``ttkd.studies.sweep``:
    its stages, step choice and report), in a store of its own; the table is read from its
    report."""
    from ttkd import presets, studies, tracking

    cfg = presets.resolve("sweep", {"seeds": str(args.seeds), "weights": "0,0.005", "methods": ",".join(kd.names()),
                                   "student_arch": args.student, "teacher_arch": args.teacher,
                                   "dataset": "digits", "device": args.device})
    with _scratch_store(), contextlib.redirect_stdout(io.StringIO()):
        studies.sweep(**cfg.stage_kwargs(), print_line=lambda line: print(line, file=sys.stderr, flush=True))
        _, [parent] = tracking.newest_runs("ttkd.stage", "sweep", limit=1)
        report = tracking.read_json(parent.info.run_id, "report.json")

    def cell(values):
        values = list(values)
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 \
            else f"{values[0]:.2f}"

    students = {(s["method"], s["weight"]): s["per_seed"] for s in report["students"]}
    teachers = {t["weight"]: t["per_seed"] for t in report["teachers"]}
    lines = ["| method | from normal teacher | from trained teacher | trained − normal (pp) |",
             "|---|---:|---:|---:|"]
    for method in kd.names():
        normal, trained = students[(method, 0.0)], students[(method, 0.005)]
        diff = [trained[seed] - normal[seed] for seed in normal if seed in trained]
        lines.append(f"| {method} | {cell(normal.values())} | {cell(trained.values())} | {cell(diff)} |")
    lines.append(f"| (no KD) | {cell(report['no_kd'][0]['per_seed'].values())} | | |")
    lines.append(f"| (teacher itself) | {cell(teachers[0.0].values())} | {cell(teachers[0.005].values())} | |")
    return "\n".join(lines)


# --- many points at once: packing and the scheduler's cost -------------------------------------

@contextlib.contextmanager
def _scratch_store():
    """A SQLite store of its own for the duration, in a temporary folder (cwd too)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="ttkd-bench-") as tmp:
        before, cwd = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        os.chdir(tmp)
        try:
            yield tmp
        finally:
            os.chdir(cwd)
            mlflow.set_tracking_uri(before)
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            if before is not None:
                os.environ["MLFLOW_TRACKING_URI"] = before


def packing(args) -> list[tuple[int, int, float, float]]:
    """(K, points, seconds, points per hour) for each K of ``args.k``."""
    import mlflow

    from ttkd.studies.plan import Point, Task
    from ttkd.studies.schedulers.ray import Placement, RayCluster

    device = resolve_device(args.device)
    cores = os.cpu_count() or 1
    rows = []
    with _scratch_store():
        for k in args.k:
            gpus = 1 / k if device.type == "cuda" else 0.0
            placement = Placement("local", cpus_per_point=cores / k if device.type == "cpu" else 1.0,
                                  gpus_per_point=gpus, threads=max(1, cores // k))
            train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device=args.device,
                                amp=args.amp, compile=args.compile)
            with mlflow.start_run(run_name=f"packing K={k}") as parent, RayCluster(placement) as cluster:
                tasks = [Task(Point("student", seed), "baseline",
                              dict(arch=args.student, train=dataclasses.replace(train, seed=seed),
                                   register_as=f"pack-{k}", tags={"ttkd.point": f"K={k} seed={seed}"},
                                   parent_run_id=parent.info.run_id, dataset=args.dataset))
                         for seed in range(args.rounds * k)]
                start = time.perf_counter()
                for task in tasks:
                    cluster.submit(task, verbose=False)
                outcomes = []
                while cluster.running:
                    outcomes += cluster.wait()
                seconds = time.perf_counter() - start
            failed = [o.error for o in outcomes if o.result is None]
            if failed:
                raise SystemExit(f"K={k}: {len(failed)} points failed: {failed[0]}")
            rows.append((k, len(tasks), seconds, len(tasks) / seconds * 3600))
            print(f"| {k} | {len(tasks)} | {seconds:.1f} | {rows[-1][3]:,.0f} | {rows[-1][3] / rows[0][3]:.2f}x |",
                  flush=True)
    return rows


def scheduler_overhead(args) -> dict[str, list[float]]:
    """Wall seconds of the same digits sweep on the local pool (jobs=2) and on Ray (cluster=local)."""
    from ttkd import presets, studies

    times: dict[str, list[float]] = {"local pool, jobs=2": [], "Ray, cluster=local": []}
    for _ in range(args.repeat):
        for label, given in (("local pool, jobs=2", {"jobs": "2"}), ("Ray, cluster=local", {"cluster": "local"})):
            cfg = presets.resolve("sweep", {"seeds": str(args.seeds), "threads": "1", **given})
            with _scratch_store(), contextlib.redirect_stdout(io.StringIO()):
                start = time.perf_counter()
                studies.sweep(**cfg.stage_kwargs(), print_line=lambda line: None)
                times[label].append(time.perf_counter() - start)
            print(f"# {label}: {times[label][-1]:.1f} s", file=sys.stderr, flush=True)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttkd.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="cnn")
    parser.add_argument("--teacher", default="preresnet20")
    parser.add_argument("--dataset", default="synthetic", help="CIFAR-shaped random data by default")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=3840, help="training images per measurement")
    parser.add_argument("--workers", type=int, default=4, help="the seed loop's DataLoader workers")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per stage; medians are reported")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", dest="amp", action="store_const", const=False, default="auto",
                        help="ttkd in float32 (default: amp=auto, bf16 where measured faster)")
    parser.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                        help="ttkd's compile setting (auto: as for a 240-epoch CIFAR stage)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--accuracy", action="store_true", help="compare accuracies instead of speed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--compile-accuracy", action="store_true",
                        help="digits: --student trained eagerly and compiled over --seeds seeds, paired difference")
    parser.add_argument("--on-disk", action="store_true",
                        help="time the baseline stage on PNG files, decoded into memory and left on disk")
    parser.add_argument("--methods", action="store_true",
                        help="time the distill stage with every KD method, relative to kd")
    parser.add_argument("--packing", action="store_true",
                        help="points per hour with K points per device at once (Ray, cluster=local); "
                             "default --student cnn --dataset digits")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="--packing: points per device")
    parser.add_argument("--rounds", type=int, default=2, help="--packing: rounds x K points per K")
    parser.add_argument("--epochs", type=int, default=2, help="--packing: epochs per point")
    parser.add_argument("--scheduler", action="store_true",
                        help="the digits sweep with jobs=2 against cluster=local, --repeat times each")
    parser.add_argument("--methods-accuracy", action="store_true",
                        help="digits: each KD method's student from a normal and a trained teacher "
                             "(default --student resnet8 --teacher cnn)")
    args = parser.parse_args(argv)
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    # the seed's 4 workers on a machine with fewer cores are what is being measured
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    device = resolve_device(args.device)
    print(f"# torch {torch.__version__}, {device} ({device_name(device)}), {torch.get_num_threads()} threads, "
          f"amp={str(args.amp).lower()}, native bf16 {'yes' if bf16_supported(device) else 'no'}", file=sys.stderr)
    if args.accuracy:
        print(accuracy_table(args))
        return
    if args.packing:
        if "--dataset" not in (argv or sys.argv):
            args.dataset = "digits"
        print(f"{args.dataset}, baseline {args.student}, {args.epochs} epochs, batch {args.batch_size}, "
              f"{device} ({device_name(device)}), {os.cpu_count()} cores; {args.rounds} x K points per K\n")
        print("| K (points per device) | points | seconds | points per hour | vs K = 1 |\n|---:|---:|---:|---:|---:|")
        packing(args)
        return
    if args.scheduler:
        times = scheduler_overhead(args)
        (local, pool), (ray, on_ray) = times.items()
        print(f"digits sweep, {args.seeds} seeds, default stages, threads=1, median of {args.repeat}: "
              f"{local} {statistics.median(pool):.1f} s, {ray} {statistics.median(on_ray):.1f} s; "
              f"Ray / local pool {statistics.median(on_ray) / statistics.median(pool):.2f}")
        return
    if args.compile_accuracy:
        print(compile_accuracy(args))
        return
    if args.methods_accuracy:
        if "--student" not in (argv or sys.argv):
            args.student = "resnet8"
        if "--teacher" not in (argv or sys.argv):
            args.teacher = "cnn"
        print(f"digits, student {args.student}, teacher {args.teacher}, {args.seeds} seeds, "
              f"default parameters; val_acc (%), mean ± std\n")
        print(method_accuracies(args))
        return
    if args.methods:
        print(f"distill: student {args.student} beside teacher {args.teacher}, batch {args.batch_size}, "
              f"{args.images} images per measurement, median of {args.repeat}\n")
        print("| method | images/s | time per step relative to kd |\n|---|---:|---:|")
        for method, rate, ratio in method_speed(args):
            print(f"| {method} | {rate:,.0f} | {ratio:.2f}x |", flush=True)
        return
    if args.on_disk:
        rates = on_disk(args)
        print(f"baseline {args.student}, {args.images} PNG images, batch {args.batch_size}, "
              f"{datasets.default_workers()} decoding workers, median of {args.repeat}: "
              + ", ".join(f"{k} {v:,.0f} images/s" for k, v in rates.items())
              + f"; on disk / in memory {rates['on disk'] / rates['in memory']:.2f}")
        return
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch_size}, "
          f"{args.images} images per measurement, median of {args.repeat}; images/s and peak MiB\n")
    print("| stage | seed loop | ttkd eager | ttkd (auto) | compute eager | compute compiled | ttkd/seed (range) | "
          "ttkd/compute | peak MiB seed / ttkd / compute |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    speed(args)


if __name__ == "__main__":
    main()
