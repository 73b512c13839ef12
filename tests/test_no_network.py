"""No network surface: a running experiment (with its panel) opens no listening socket, and rf_notebook never
evaluates text or unpickles files it did not write with weights only."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn

PACKAGE = Path(__file__).parents[1] / "rf_notebook"


def listening_sockets() -> list[str]:
    """This process's listening TCP sockets and bound, unconnected UDP / raw sockets, from /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        path = Path("/proc/self/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            # TCP: in LISTEN state; UDP / raw: bound and not connected to one peer (a DNS client's socket is)
            remote = fields[2]
            listening = state == "0A" if table.startswith("tcp") else set(remote.replace(":", "")) == {"0"}
            if inode in inodes and listening:
                found.append(f"{table} {local}")
    return found


def test_a_running_experiment_listens_on_no_socket(tmp_path):
    assert listening_sockets() == []
    exp = Experiment("quiet", experiments_dir=tmp_path)
    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(learning_rate=List([3e-3, 1e-3]), max_steps=8, per_device_train_batch_size=8),
        ),
        trainer_type="SFT",
    )
    exp.run_fit(group, demo_model_fn, arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=8), num_chunks=2)
    from rf_notebook.widget import Panel

    panel = Panel(exp)
    panel.training_started()  # the panel's writer thread too
    seen = []
    while not exp.wait(timeout=0.05):
        seen.extend(listening_sockets())
    seen.extend(listening_sockets())
    panel.stop_writer()
    exp.end(wait=False)
    assert seen == []


def test_checkpoints_at_chunk_ends_ask_the_hub_nothing(tmp_path, monkeypatch):
    """PEFT's state dict asks the Hub whether the base's config exists (a DNS lookup, then HTTPS) unless told what to
    save: every chunk end's checkpoint did so, which `listening_sockets` caught once as a bound UDP socket."""
    from peft.utils import save_and_load

    asked = []
    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", lambda *args, **kw: asked.append(args))
    exp = Experiment("no-hub", experiments_dir=tmp_path)
    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(max_steps=4, per_device_train_batch_size=8),
        ),
        trainer_type="SFT",
    )

    def hub_named(model_config):  # a base known by a Hub id, as users' are (the demo's is a local folder)
        model, tokenizer = demo_model_fn(model_config)
        model.name_or_path = model.config._name_or_path = "example-org/not-a-local-folder"
        return model, tokenizer

    exp.run_fit(group, hub_named, arithmetic_dataset("train", n=32), None, num_chunks=2)
    assert exp.wait(timeout=300)
    assert [r.status.value for r in exp.runs()] == ["finished"]
    assert (tmp_path / "no-hub" / "runs").exists() and list((tmp_path / "no-hub").rglob("step-*"))  # checkpointed
    exp.end(wait=False)
    assert asked == []


def test_no_text_is_evaluated_and_nothing_is_unpickled():
    """No eval / exec / compile, no pickle, and every torch.load reads weights only."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                owner = getattr(getattr(node.func, "value", None), "id", "")
                builtin = isinstance(node.func, ast.Name) or owner == "builtins"
                if builtin and name in ("eval", "exec", "compile", "__import__"):
                    offenders.append(f"{path.name}:{node.lineno} {name}()")
                if name == "load" and isinstance(node.func, ast.Attribute):
                    weights_only = any(
                        k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords
                    )
                    if owner == "pickle" or (owner == "torch" and not weights_only):
                        offenders.append(f"{path.name}:{node.lineno} {owner}.load")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n in ("pickle", "marshal", "shelve", "dill") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports {names}")
    assert offenders == []


def test_bitsandbytes_notice_about_a_hub_kernel_stays_off_stderr():
    """On CPUs with AVX512-BF16, importing bitsandbytes (PEFT does) warns that a kernel it would fetch from the Hub
    is missing: rf_notebook logs that at DEBUG, so a notebook's stderr stays clean. Other warnings still show."""
    import subprocess
    import sys

    code = (
        "import logging, rf_notebook, bitsandbytes\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s.', 'No module named kernels')\n"
        "log.warning('another warning')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr
    assert "another warning" in proc.stderr
