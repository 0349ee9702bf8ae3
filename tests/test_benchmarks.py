"""The benchmark runs and reports; its figures are in the README, never asserted here."""

import re

from benchmarks import bench


def test_speed_benchmark_reports_every_stage(capsys):
    bench.main(["--images", "128", "--batch-size", "32", "--workers", "0", "--dataset", "synthetic-3x16x16-10"])
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if re.match(r"\| (baseline|teach|distill) \|", l)]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "teach", "distill"]
    for row in rows:
        seed, ours, compute = (float(c.replace(",", "")) for c in row.split("|")[2:5])
        assert seed > 0 and ours > 0 and compute > 0


def test_seed_style_dataset_matches_ttkd_normalisation():
    from ttkd import data
    d = data.load("digits")
    image, label = bench.SeedStyleDataset(d, "val", augment=False)[3]
    ours = next(data.batches(d, "val", 8))[0][3]
    assert label == int(d.val_y[3]) and image.shape == ours.shape
    assert (image - ours).abs().max() < 1e-5


def test_on_disk_benchmark_times_both_paths(capsys):
    bench.main(["--on-disk", "--images", "64", "--batch-size", "16", "--repeat", "1",
                "--dataset", "synthetic-3x16x16-10"])
    out = capsys.readouterr().out
    found = re.search(r"in memory ([\d,]+) images/s, on disk ([\d,]+) images/s", out)
    assert found and all(float(g.replace(",", "")) > 0 for g in found.groups())


def test_method_benchmark_times_every_method(capsys):
    from ttkd import kd
    bench.main(["--methods", "--images", "64", "--batch-size", "16", "--repeat", "1",
                "--dataset", "synthetic-3x16x16-10"])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and "x |" in l]
    assert [r.split("|")[1].strip() for r in rows] == kd.names()
    assert rows[0].endswith("| 1.00x |")  # kd against itself
