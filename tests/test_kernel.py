"""The panel's buttons while another cell blocks (Run All reaches `exp.wait()` during training), on a real ipykernel.

A kernel runs a demo sweep with its panel, then `exp.wait()`; while that cell is busy, a Stop click arrives as
the front end sends it: on the main shell (VS Code, Colab, subshells off: served from inside `wait()`), and on a
kernel subshell (JupyterLab >= 4.4 / Notebook >= 7.4). The stop must be applied within 2 s while the cell still
runs, and the cell queued after it (as Run All queues them) must run after it, in order.

Both on ipykernel 7.4 (this environment's) and on ipykernel 6.29 (Colab's kernel generation: no subshells, its own
message queue), the latter from a small overlay environment that adds only ipykernel 6 to this one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

jupyter_client = pytest.importorskip("jupyter_client")

SETUP = """
import os, time
from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn
group = RFGridSearch(RFModelConfig(DEMO_MODEL, peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    training_args=RFSFTConfig(learning_rate=List([3e-3, 1e-3]), per_device_train_batch_size=8, max_steps=400)),
    trainer_type="SFT")
exp = Experiment("busy", experiments_dir={directory!r})
exp.run_fit(group, demo_model_fn, arithmetic_dataset("train", n=64), None, num_chunks=4, seed=0)
import threading
threads, handle_op = [], exp._panel.handle_op
exp._panel.handle_op = lambda request: threads.append(threading.current_thread().name) or handle_op(request)
print("COMM", exp._panel.comm.comm_id)
"""


IPYKERNEL_6 = "ipykernel==6.29.5"


@pytest.fixture(scope="session")
def ipykernel6(tmp_path_factory) -> Path:
    """A kernelspec folder whose kernel is ipykernel 6.29 over this environment's packages (a venv whose .pth adds
    this one's site-packages; only ipykernel and what it lacks are installed into it, from PyPI)."""
    root = tmp_path_factory.mktemp("ipykernel6")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    ours = sysconfig.get_paths()["purelib"]
    (Path(site) / "_rf_notebook_base.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", IPYKERNEL_6], check=True
    )
    spec = root / "kernels" / "ipykernel6"
    spec.mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "ipykernel 6", "language": "python"}))
    return root / "kernels"


@pytest.fixture(params=["ipykernel 7.4", "ipykernel 6.29"])
def kernel(request):
    if request.param == "ipykernel 6.29":
        from jupyter_client.kernelspec import KernelSpecManager

        specs = KernelSpecManager(kernel_dirs=[str(request.getfixturevalue("ipykernel6"))])
        manager = jupyter_client.KernelManager(kernel_name="ipykernel6", kernel_spec_manager=specs)
        manager.start_kernel()
        client = manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
    else:
        manager, client = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    version = output_of(client, client.execute("import ipykernel; print(ipykernel.__version__)"), timeout=60).strip()
    assert version == request.param.split()[-1] or version.startswith(request.param.split()[-1] + "."), version
    client.rf_ipykernel = version
    yield client
    client.stop_channels()
    manager.shutdown_kernel(now=True)


def output_of(client, msg_id, timeout=300):
    """The text a cell printed, once it is idle."""
    text = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        msg = client.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(text)
    raise AssertionError("the cell did not finish")


@pytest.mark.parametrize("channel", ["main shell", "subshell"])
def test_a_click_acts_while_a_cell_blocks_in_wait(channel, kernel, tmp_path):
    if channel == "subshell" and kernel.rf_ipykernel.startswith("6."):
        pytest.skip("ipykernel 6 has no subshells")
    setup = output_of(kernel, kernel.execute(SETUP.format(directory=str(tmp_path))))
    comm_id = setup.split("COMM ")[-1].split()[0]
    subshell = None
    if channel == "subshell":
        kernel.control_channel.send(kernel.session.msg("create_subshell_request", {}))
        subshell = kernel.get_control_msg(timeout=30)["content"]["subshell_id"]

    blocked = kernel.execute("t0 = time.time(); exp.wait(); print('WAITED', round(time.time() - t0, 1))")
    after = kernel.execute("print('AFTER', [r.status.value for r in exp.runs()])")  # queued as Run All does
    time.sleep(3)  # training runs; the wait cell is busy

    def click(run_id: int) -> tuple[float, dict]:
        content = {"type": "op", "op": "stop", "run_id": run_id, "id": run_id}
        msg = kernel.session.msg("comm_msg", {"comm_id": comm_id, "data": {"method": "custom", "content": content}})
        if subshell is not None:
            msg["header"]["subshell_id"] = subshell
        sent = time.time()
        kernel.shell_channel.send(msg)
        while time.time() - sent < 10:
            reply = kernel.get_iopub_msg(timeout=10)
            data = reply["content"].get("data", {}).get("content", {}) if reply["msg_type"] == "comm_msg" else {}
            if data.get("type") == "reply" and data.get("id") == run_id:
                return time.time() - sent, data
        raise AssertionError(f"no reply to the click on run {run_id} while the cell was blocked")

    latency, content = click(1)
    assert content["ok"], content
    assert latency < 2.0, f"the click was answered after {latency:.1f} s"
    assert click(2)[1]["ok"]  # nothing left to train: wait() returns
    waited = output_of(kernel, blocked)
    assert "WAITED" in waited
    assert output_of(kernel, after).startswith("AFTER ['stopped', 'stopped']")  # ran after the wait, in order
    status = output_of(
        kernel, kernel.execute("print([(o.op, o.run_id, o.origin, o.outcome) for o in exp.store.ic_log()][:1])")
    )
    assert "('stop', 1, 'panel', 'applied')" in status
    # On a subshell the click is handled on the subshell's own thread; on the main shell, inside wait()
    handled_on = output_of(kernel, kernel.execute("print(threads)"))
    if subshell is None:
        assert handled_on.strip() == "['MainThread', 'MainThread']"
    else:
        assert "MainThread" not in handled_on and handled_on.count("subshell") == 2, handled_on
    output_of(kernel, kernel.execute("exp.end(wait=False)"))


def test_info_reports_the_kernel_and_what_rf_notebook_does_about_it(kernel):
    """`rf_notebook.info()` in a kernel: the ipykernel version, and that clicks reach the panel while a cell blocks
    (both ipykernel 7.4 and Colab's 6.29); `python -m rf_notebook info` outside one says how to get those facts."""
    said = output_of(kernel, kernel.execute("import rf_notebook; rf_notebook.info()"))
    assert f"ipykernel {kernel.rf_ipykernel}" in said and "front end: Jupyter kernel; panel in push mode" in said
    assert "clicks arrive on a subshell or are served by the wait itself" in said, said
    assert "NOT SUPPORTED" not in said


def test_info_outside_a_kernel_names_versions_device_and_precision():
    out = subprocess.run([sys.executable, "-m", "rf_notebook", "info"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("rf_notebook ") and lines[1].startswith("versions: torch ")
    assert "device: GPUs none" in out.stdout and "precision: CPU: float32" in out.stdout
    assert "buttons: not in a Jupyter kernel" in out.stdout
    assert "QLoRA: bitsandbytes 0.50" in out.stdout


def test_info_in_colab_says_the_panel_polls(monkeypatch):
    import types

    from rf_notebook._info import facts

    monkeypatch.delenv("RF_NOTEBOOK_PANEL_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    found = facts()
    assert found["colab"] and found["panel"].startswith("pull mode (Colab"), found["panel"]
