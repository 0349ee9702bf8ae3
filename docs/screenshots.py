"""Screenshots of ttkd in MLflow's UI, taken in a real headless Chromium, for the docs.

Run by hand, not in CI. It needs Debian's Chromium and its driver, and selenium:

    apt-get install chromium chromium-driver
    pip install -e '.[docs]'
    python docs/screenshots.py              # a fresh store in a temporary folder (about 3 min on 2 CPU cores)
    python docs/screenshots.py --store DIR  # keep the store in DIR; a second call reuses what it trained

It trains, as a user would, the study (`mlflow run .`, experiment Default) and the tutorial's sweep
(`mlflow run --experiment-name digits-sweep . -e sweep`), starts `mlflow ui` on 127.0.0.1 in front
of that store, and saves under docs/screenshots/:

    study.png          the study's experiment (Default) as it opens: MLflow's model-training view
    runs.png           the sweep's experiment: its parent run and the points under it
    sweep-figure.png   the sweep's parent run, its figure accuracy_vs_latency.png opened from the artifacts
    registry.png       the registered models with their champion aliases
    model-version.png  a version's page with its tags (costs, lineage)
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from mlflow import MlflowClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "screenshots"
SWEEP = ["-P", "seeds=5", "-P", "weights=-0.02,0,0.005,0.02"]  # the sweep of the tutorial


def train(store: Path, client: MlflowClient) -> None:
    """The study and the sweep, unless the store has them already."""
    if not client.search_registered_models("name = 'digits-student-kd-trained'"):
        subprocess.run(["mlflow", "run", str(REPO), "--env-manager", "local"], cwd=store, check=True)
    if client.get_experiment_by_name("digits-sweep") is None:
        subprocess.run(["mlflow", "run", "--experiment-name", "digits-sweep", str(REPO), "-e", "sweep",
                        "--env-manager", "local", *SWEEP], cwd=store, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    ui = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
                           "--host", "127.0.0.1", "--port", str(port)], cwd=store,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return ui, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    ui.kill()
    sys.exit(f"mlflow ui did not answer at {url} within 60 s")


def browser() -> webdriver.Chrome:
    driver = shutil.which("chromedriver")
    if driver is None:
        sys.exit("chromedriver not found; install Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(page: webdriver.Chrome, text: str) -> None:
    """Wait until the page shows text (the data, not just the frame), then for drawing to finish."""
    WebDriverWait(page, 60).until(lambda p: text in p.find_element(By.TAG_NAME, "body").text)
    time.sleep(2)


def click(page: webdriver.Chrome, text: str) -> None:
    """Click the element whose own text is text, as a user would."""
    found = WebDriverWait(page, 60).until(lambda p: p.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']"))
    found[0].click()


def expand(page: webdriver.Chrome, run_name: str, child_text: str) -> None:
    """Open a parent run's row in the runs list, so that its child runs show under it."""
    wait_for(page, run_name)
    row = f"//*[normalize-space(text())='{run_name}']/ancestor::*[@role='row'][1]"
    page.find_element(By.XPATH, f"{row}//button").click()
    wait_for(page, child_text)


def save(page: webdriver.Chrome, name: str) -> None:
    page.save_screenshot(str(OUT / name))
    print(f"{OUT / name}  ({page.current_url})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="folder of the tracking store (default: a temporary one)")
    args = parser.parse_args()
    store = (args.store or Path(tempfile.mkdtemp(prefix="ttkd-screenshots-"))).resolve()
    store.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"  # this process's and its children's
    client = MlflowClient()
    train(store, client)

    sweep = client.get_experiment_by_name("digits-sweep")
    parent = client.search_runs([sweep.experiment_id], "tags.`ttkd.stage` = 'sweep'", max_results=1)[0]
    student = client.get_model_version_by_alias("digits-student-kd", "champion")
    study = client.search_runs(["0"], "tags.`ttkd.stage` = 'main'", max_results=1)[0]
    OUT.mkdir(exist_ok=True)
    ui, url = start_ui(store)
    page = browser()
    try:
        # MLflow 3.17's UI picks its view from a switch it keeps in the browser (GenAI by default), not from the
        # experiment's mlflow.experimentKind tag: choose "Model training" once, as the docs tell a user to
        page.get(f"{url}/#/experiments")
        page.execute_script("window.localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"  # no chat panel
                            "window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
        page.refresh()
        click(page, "Model training")
        page.get(f"{url}/#/experiments/0")  # the experiment's own page, as a click in the list opens it
        expand(page, study.info.run_name, "teach cnn")
        save(page, "study.png")
        page.get(f"{url}/#/experiments/{sweep.experiment_id}")
        expand(page, parent.info.run_name, "teach cnn")
        save(page, "runs.png")
        click(page, parent.info.run_name)  # the sweep's parent run, its artifacts, its figure
        click(page, "Artifacts")
        click(page, "accuracy_vs_latency.png")
        wait_for(page, "Path:")
        save(page, "sweep-figure.png")
        page.get(f"{url}/#/models")
        click(page, "Try it now")  # MLflow's one-time announcement of its registry UI, over the list
        wait_for(page, "champion")
        save(page, "registry.png")
        page.get(f"{url}/#/models/digits-student-kd/versions/{student.version}")
        wait_for(page, "ttkd.latency_ms_b1_cpu")
        save(page, "model-version.png")
    finally:
        page.quit()
        ui.terminate()
        ui.wait(10)
    print(f"store: {store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
