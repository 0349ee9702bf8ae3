"""The benchmark runs and reports; its figures are in docs/explanation/speed.md, never asserted here."""

import re

import pytest

from benchmarks import bench


@pytest.mark.slow  # the compiled compute path compiles each stage's networks
def test_speed_benchmark_reports_the_stages_asked_for(capsys, monkeypatch):
    """One stage, the one with both networks: each stage's compiled column costs an inductor compile."""
    from ttkd import calibration
    monkeypatch.setattr(calibration, "MAX_MEASURE_S", 0.0)  # the 240-epoch stage's longer look: not what is tested
    bench.main(["--images", "128", "--batch-size", "32", "--workers", "0", "--dataset", "synthetic-3x16x16-10",
                "--student", "mlp", "--teacher", "cnn", "--stages", "distill",
                "--repeat", "1", "--compile", "false"])
    captured = capsys.readouterr()
    rows = [l for l in captured.out.splitlines() if re.match(r"\| (baseline|teach|distill) \|", l)]
    assert [r.split("|")[1].strip() for r in rows] == ["distill"]
    for row in rows:
        cells = row.split("|")[2:9]
        rates = [float(c.replace(",", "")) for c in cells[:5]]  # seed, ttkd eager, ttkd, compute eager, compiled
        assert min(rates) > 0 and re.fullmatch(r" \d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\) ", cells[5])
        assert re.fullmatch(r" \d+% ", cells[6])
    assert "# distill: ttkd trains in " in captured.err and "compile off (compile=false)" in captured.err


def test_seed_style_dataset_matches_ttkd_normalisation():
    from ttkd import data
    d = data.load("digits")
    image, label = bench.SeedStyleDataset(d, "val", augment=False)[3]
    ours = next(data.batches(d, "val", 8))[0][3]
    assert label == int(d.val_y[3]) and image.shape == ours.shape
    assert (image - ours).abs().max() < 1e-5


def test_on_disk_benchmark_times_both_paths(capsys):
    bench.main(["--on-disk", "--images", "64", "--batch-size", "16", "--repeat", "1", "--compile", "false",
                "--dataset", "synthetic-3x16x16-10"])
    out = capsys.readouterr().out
    found = re.search(r"in memory ([\d,]+) images/s, on disk ([\d,]+) images/s", out)
    assert found and all(float(g.replace(",", "")) > 0 for g in found.groups())


def test_method_benchmark_times_every_method(capsys):
    from ttkd import kd
    bench.main(["--methods", "--images", "64", "--batch-size", "16", "--repeat", "1",
                "--dataset", "synthetic-3x16x16-10", "--compile", "false"])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and "x |" in l]
    assert [r.split("|")[1].strip() for r in rows] == kd.names()
    assert rows[0].endswith("| 1.00x |")  # kd against itself


@pytest.mark.slow  # starts a Ray instance per K
def test_packing_benchmark_reports_points_per_hour_for_each_k(capsys):
    bench.main(["--packing", "--k", "1", "2", "--rounds", "1", "--epochs", "1", "--student", "mlp",
                "--compile", "false"])
    rows = [l for l in capsys.readouterr().out.splitlines() if re.match(r"\| \d+ \| \d+ \|", l)]
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows] == [("1", "1"), ("2", "2")]
    assert all(float(r.split("|")[4].replace(",", "")) > 0 for r in rows) and rows[0].endswith("| 1.00x |")
