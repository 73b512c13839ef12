"""MLflow's own UI, served by `mlflow ui` on 127.0.0.1, lists the runs of a quickstart-shaped experiment logged with
`trackers=["mlflow"]` (the README's screenshot is this test's, docs/img/mlflow-ui.png)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from jupyter_e2e import free_port
from playwright.sync_api import expect

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn


def quickstart(max_steps: int) -> RFGridSearch:
    """notebooks/quickstart.ipynb's search (same runs, same names), fewer steps."""
    return RFGridSearch(
        RFModelConfig(
            model_name=DEMO_MODEL,
            peft_config=RFLoraConfig(r=List([4, 16]), lora_alpha=16, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=List([3e-3, 3e-4]), per_device_train_batch_size=16, max_steps=max_steps
            ),
        ),
        trainer_type="SFT",
    )


def test_mlflow_ui_lists_the_quickstart_runs(page, shots, tmp_path):
    exp = Experiment("quickstart", experiments_dir=tmp_path, trackers=["mlflow"])
    train, evl = arithmetic_dataset("train", n=256), arithmetic_dataset("eval", n=32)
    exp.run_fit(quickstart(16), demo_model_fn, train, evl, num_chunks=4, seed=0, display=False)
    assert exp.wait(timeout=600) and not exp.tracking_errors()
    names = [r.name for r in exp.runs()]
    exp.end()

    port = free_port()
    uri = f"sqlite:///{(exp.path / 'mlflow.db').resolve()}"
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        start_new_session=True,  # its workers are stopped with it
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode(errors="replace")[-3000:]
                assert time.time() < deadline, "mlflow ui did not start in 120 s"
                time.sleep(0.5)
        from mlflow.tracking import MlflowClient

        experiment_id = MlflowClient(uri).get_experiment_by_name("quickstart").experiment_id
        page.goto(f"{base}/#/experiments/{experiment_id}/runs")
        _dismiss(page)
        for name in names:
            expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
        page.wait_for_timeout(1000)  # let the table's last columns settle before the picture
        shots("mlflow-ui-runs")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _dismiss(page) -> None:
    """MLflow 3's UI opens in its GenAI view with a tip and an assistant panel: the training runs' table instead."""
    page.wait_for_timeout(3000)
    for role, name in [("button", "Got it"), ("radio", "Model training"), ("button", "Model training")]:
        target = page.get_by_role(role, name=name)
        if target.count() and target.first.is_visible():
            target.first.click()
            page.wait_for_timeout(500)
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() and close.first.is_visible():
        close.first.click()
