"""A registered model as users serve it: uint8 images in, classes out; and the predict
entry point on a folder of image files."""

import contextlib
import csv
import io
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from PIL import Image

from tests.servers import free_port
from ttkd import data
from ttkd.serving import pixels

DIGIT = (1, 8, 8)


def test_pixels_take_both_layouts_and_numbers_that_are_pixel_values():
    a = np.arange(2 * 8 * 8 * 3).reshape(2, 8, 8, 3) % 256
    nchw = pixels(a.transpose(0, 3, 1, 2).tolist(), (3, 8, 8))
    assert np.array_equal(pixels(a.astype(np.uint8), (3, 8, 8)), nchw) and nchw.shape == (2, 3, 8, 8)
    assert np.array_equal(pixels(a.astype(float), (3, 8, 8)), nchw)  # 12.0 is a pixel value too
    assert pixels(np.zeros((5, 8, 8), np.uint8), DIGIT).shape == (5, 1, 8, 8)  # one channel: (N, H, W)


@pytest.mark.parametrize("images, reason", [
    (np.zeros((1, 8, 8, 3)), r"got images of shape \(8, 8, 3\); expected uint8 images of 8x8 pixels with 1 channel"),
    (np.zeros((2, 1, 16, 16)), r"got images of shape \(1, 16, 16\)"),
    (np.zeros((8, 8)), r"got an array of shape \(1, 8, 8\)|got an array of shape \(8, 8\)"),
    (np.full((1, 1, 8, 8), 0.5), r"the images hold fractional values \(such as 0.5\); .*raw pixel values 0 to 255, "
                                 r"not normalised ones"),
    (np.full((1, 1, 8, 8), 256), r"pixel values must be 0 to 255 \(got 256 to 256\)"),
    ([[["a"] * 8] * 8], r"the images hold str\d* values, not numbers"),
    ([[[0] * 8] * 8, [[0] * 7] * 8], r"the images are not all the same size"),
    (pd.DataFrame({"a": [1]}), r"send the images as a tensor"),
    (np.full((1, 1, 8, 8), np.inf), r"the images hold values that are not finite numbers \(such as inf\)"),
    (np.full((1, 1, 8, 8), -np.inf), r"not finite numbers \(such as -inf\)"),
    (np.full((1, 1, 8, 8), np.nan), r"not finite numbers \(such as nan\)"),
])
def test_pixels_refuse_what_is_not_an_image_batch_in_one_line(images, reason):
    with pytest.raises(MlflowException, match=reason) as exc:
        pixels(images, DIGIT)
    assert "\n" not in exc.value.message and exc.value.get_http_status_code() == 400


@pytest.fixture()
def champion(store, cli):
    """A digits mlp, trained and promoted: models:/digits-mlp@champion."""
    assert cli("baseline", "--epochs", "8")[0] == 0
    assert cli("promote", "--model", "digits-mlp")[0] == 0
    return "models:/digits-mlp@champion"


def save_digit(path, pixels_2d):
    Image.fromarray(pixels_2d.astype(np.uint8)).save(path)


def test_predict_classifies_a_folder_skips_what_is_not_an_image_and_logs_a_csv(champion, cli, tmp_path):
    digits = data.load("digits")
    folder = tmp_path / "mine"
    (folder / "more").mkdir(parents=True)
    for i in range(3):
        save_digit(folder / f"d{i}.png", digits.val_x[i, 0].numpy())
    big = np.kron(digits.val_x[3, 0].numpy(), np.ones((4, 4), np.uint8))  # 32x32, in colour: resized, greyed
    Image.fromarray(np.stack([big] * 3, axis=-1)).save(folder / "more" / "big.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "cut.png").write_bytes((folder / "d0.png").read_bytes()[:40])
    (folder / ".hidden.png").write_bytes(b"ignored")
    odd = folder / "caf\udce9.png"  # a name written on another system: byte 0xE9, not UTF-8
    odd.write_bytes((folder / "d0.png").read_bytes())

    status, out, err = cli("predict", "--model", "digits-mlp@champion", "--images", str(folder))
    assert status == 0, err
    assert "5 images classified with models:/digits-mlp/1 (1 resized to the model's size)" in out
    assert "skipped notes.txt: cannot identify image file" in out and "skipped cut.png:" in out
    run = mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.stage` = 'predict'")[0]
    assert run.info.status == "FINISHED" and run.data.params["model"] == "models:/digits-mlp/1"
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/predictions.csv"))))
    assert [r["file"] for r in rows] == ["caf\\xe9.png", "d0.png", "d1.png", "d2.png", "more/big.jpg"]
    assert rows[0]["class"] == rows[1]["class"]  # the same image
    rows = rows[1:]
    served = mlflow.pyfunc.load_model(champion).predict(digits.val_x[:3].numpy())
    assert [int(r["class"]) for r in rows[:3]] == list(served["class"])
    assert [r["name"] for r in rows[:3]] == list(served["name"])
    assert np.allclose([float(r["probability"]) for r in rows[:3]], served["probability"], atol=1e-5)
    skipped = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/skipped.csv").splitlines()
    assert [line.split(",")[0] for line in skipped] == ["file", "cut.png", "notes.txt"]


def test_predict_on_an_empty_or_unreadable_folder_is_one_line_and_opens_no_run(champion, cli, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("not a png")
    for folder, message in ((tmp_path / "empty", f"{tmp_path / 'empty'} holds no files; give a folder of image files"),
                            (tmp_path / "junk", f"none of the 1 files in {tmp_path / 'junk'} is a readable image "
                                                f"(a.png: cannot identify image file")):
        status, _, err = cli("predict", "--model", "digits-mlp", "--images", str(folder))
        assert status == 1 and message in err and err.count("\n") == 1
    status, _, err = cli("predict", "--model", "digits-mlp", "--images", "")  # not the current folder
    assert status == 1 and "images is empty; give the folder of image files to classify" in err
    assert mlflow.search_runs(output_format="list", filter_string="tags.`ttkd.stage` = 'predict'") == []


def test_the_served_model_answers_a_request_larger_than_its_chunk_whole_and_in_order(champion):
    from ttkd.serving import CHUNK
    model = mlflow.pyfunc.load_model(champion)
    digits = data.load("digits").val_x.numpy()
    many = np.concatenate([digits] * (3 * CHUNK // len(digits) + 1))  # several chunks, the last one partial
    assert len(many) > 3 * CHUNK and len(many) % CHUNK
    answer = model.predict(many)
    assert len(answer) == len(many)
    assert list(answer["class"][:len(digits)]) == list(answer["class"][-len(digits):])


@contextlib.contextmanager
def served(model_uri: str, store: str):
    """The serve entry point on ``model_uri``, on its default host (127.0.0.1)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "entry.serve", "--model", model_uri, "--port", str(port)],
                            env={"MLFLOW_TRACKING_URI": store,
                             **{k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while not _answers(url + "/ping"):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "slow"
            time.sleep(0.5)
        yield url + "/invocations"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(url, timeout=1).ok
    return False


@pytest.mark.slow
def test_the_served_champion_answers_a_request_made_from_a_png_with_its_class(champion, store, tmp_path):
    digits = data.load("digits")
    png = tmp_path / "digit.png"
    with served(champion, store) as url:
        right = 0
        for i in range(30):  # the request a user builds from a PNG file, as in docs/tutorial/4-serve.md
            save_digit(png, digits.val_x[i, 0].numpy())
            request = {"inputs": [np.asarray(Image.open(png)).tolist()]}
            answer = requests.post(url, json=request, timeout=30)
            assert answer.status_code == 200, answer.text
            [prediction] = answer.json()["predictions"]
            assert set(prediction) == {"class", "name", "probability", "probabilities"}
            right += prediction["class"] == int(digits.val_y[i]) and prediction["name"] == str(int(digits.val_y[i]))
        assert right >= 27  # the mlp is about 95% right on digits after 8 epochs

        bad = {"size": np.zeros((1, 16, 16), int).tolist(), "channels": np.zeros((1, 8, 8, 3), int).tolist(),
               "dtype": np.full((1, 8, 8), 0.25).tolist()}
        for what, images in bad.items():
            answer = requests.post(url, json={"inputs": images}, timeout=30)
            reason = answer.json()["message"].splitlines()[-1]
            assert answer.status_code == 400 and reason.startswith("Error: "), (what, answer.text)
            assert "expected uint8 images of 8x8 pixels with 1 channel" in reason and "Traceback" not in answer.text
        bare = requests.post(url, data=b'{"inputs": [[0]]}', timeout=30)  # bytes: requests sends no Content-Type
        assert bare.status_code == 415 and "the request has no Content-Type" in bare.json()["message"], bare.text
        assert "\n" not in bare.json()["message"]
