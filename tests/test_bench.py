"""The benchmark commands run end to end (tiny sizes, results in a temporary folder). Not a timing test: it
checks that `python -m bench.<name>` still works and writes its JSON and its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "module, args, result",
    [
        ("overhead", ["--runs", "2", "--num-chunks", "2", "--max-steps", "4", "--repeats", "1"], "overhead-demo-n2"),
        (
            "first_comparison",
            ["--runs", "2", "--num-chunks", "2", "--max-steps", "4", "--repeats", "1"],
            "first_comparison-demo",
        ),
        ("first_step", ["--max-steps", "8", "--num-chunks", "2", "--repeats", "1"], "first_step-demo"),
        ("thread", ["--max-steps", "4", "--repeats", "1"], "thread-demo"),
        (
            "ray_scale",
            ["--runs", "2", "--max-steps", "4", "--num-chunks", "2", "--rounds", "1"],
            "ray_scale-demo",
        ),
        (
            "reference",
            ["--runs", "2", "--num-chunks", "2", "--max-steps", "4", "--batch-size", "4", "--repeats", "1"],
            "reference-demo",
        ),
        ("kernel", ["--runs", "2", "--num-chunks", "2", "--max-steps", "4", "--repeats", "1"], "kernel-demo"),
        ("profile", ["--runs", "2", "--num-chunks", "2", "--max-steps", "4", "--repeats", "1"], "profile-demo"),
        ("scale", ["--sizes", "1", "2", "--max-steps", "4", "--num-chunks", "2"], "scale-demo"),
        ("fused", ["--sizes", "2", "--batches", "4", "--max-steps", "4", "--repeats", "1"], "fused-demo"),
        ("walks", ["--runs", "2", "--num-chunks", "2", "--max-steps", "4", "--repeats", "1"], "walks-demo"),
        ("memory", ["--model", "demo", "--runs", "1", "2"], "memory-demo"),
        ("ic_ops", ["--trials", "1"], "ic_ops"),
        ("checkpoint", ["--runs", "2", "--num-chunks", "2", "--max-steps", "4", "--repeats", "1"], "checkpoint-demo"),
        ("pruning", ["--seeds", "1", "--configs", "4", "--rows", "64", "--num-chunks", "2"], "pruning"),
        (
            "search",
            ["--seeds", "1", "--rows", "32", "--num-chunks", "2", "--num-runs", "2", "--budget", "4"],
            "search-b4",
        ),
        ("tracking", ["--num-chunks", "2", "--max-steps", "4", "--repeats", "1"], "tracking-demo"),
        (
            "time_to_best",
            ["--seeds", "1", "--configs", "3", "--rows", "32", "--num-chunks", "2", "--probe-steps", "1"],
            "time_to_best-probe1",
        ),
    ],
)
def test_benchmark_command_writes_json_and_table(module, args, result, tmp_path):
    env = {**os.environ, "RF_BENCH_OUT": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    data = json.loads((tmp_path / "results" / f"{result}.json").read_text())
    assert data["command"].startswith(f"python -m bench.{module} ") and data["date"] and data["machine"]
    table = (tmp_path / "BENCHMARKS.md").read_text()
    assert data["command"] in table


# A notebook in the shape of RapidFire AI's SFT tutorial, written here (theirs are not copied into this repository).
RAPIDFIRE_SHAPED = [
    "from rapidfireai import Experiment\nfrom rapidfireai.automl import List, RFGridSearch, RFModelConfig, "
    "RFLoraConfig, RFSFTConfig",
    "from datasets import load_dataset\n"
    "dataset = load_dataset('bitext/Bitext-customer-support-llm-chatbot-training-dataset')\n"
    "train_dataset = dataset['train'].select(range(128))\neval_dataset = dataset['train'].select(range(128, 136))",
    "def formatting(row):\n"
    "    return {'prompt': [{'role': 'user', 'content': row['instruction']}],\n"
    "            'completion': [{'role': 'assistant', 'content': row['response']}]}",
    "experiment = Experiment(experiment_name='exp1-shape', mode='fit')",
    "def create_model(model_config):\n"
    "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "    name = model_config['model_name']\n"
    "    return AutoModelForCausalLM.from_pretrained(name, **model_config['model_kwargs']), "
    "AutoTokenizer.from_pretrained(name)",
    "config_set = List([RFModelConfig(\n"
    "    model_name='TinyLlama/TinyLlama-1.1B-Chat-v1.0',\n"
    "    peft_config=List([RFLoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj']),\n"
    "                      RFLoraConfig(r=16, lora_alpha=32, target_modules=['q_proj', 'k_proj'])]),\n"
    "    training_args=RFSFTConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_steps=128, bf16=True,\n"
    "                              eval_strategy='steps', eval_steps=4),\n"
    "    model_type='causal_lm', model_kwargs={'device_map': 'auto', 'torch_dtype': 'auto'},\n"
    "    formatting_func=formatting)])",
    "config_group = RFGridSearch(configs=config_set, trainer_type='SFT')\n"
    "experiment.run_fit(config_group, create_model, train_dataset, eval_dataset, num_chunks=4, seed=42)",
    "experiment.end()",
]


def test_tutorial_harness_runs_a_rapidfire_shaped_notebook_as_its_users_do(tmp_path):
    """bench.tutorials end to end on RAPIDFIRE_SHAPED: converted (imports, the model id to its own local copy, Hub
    data to local rows, the listed fewer-steps substitution), executed top to bottom in a real kernel with
    `experiment.end()` right after `run_fit` and no `wait()`, and every run found trained, each its own config. A
    substitution that no longer matches is an error, not a silent no-op."""
    import nbformat

    from bench import tutorials

    source = tmp_path / "src"
    (source / "fine-tuning").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in RAPIDFIRE_SHAPED])
    nbformat.write(nb, source / "fine-tuning" / "t.ipynb")
    work = tmp_path / "work"
    work.mkdir()
    tutorial = tutorials.Tutorial("fine-tuning/t.ipynb", [("max_steps=128", "max_steps=8")])
    converted, changes = tutorials.convert(source, tutorial, work)
    code = [c.source for c in converted.cells]
    assert code[0].startswith("from rf_notebook import Experiment\nfrom rf_notebook import List,")
    assert "from _local_hub import load_dataset" in code[1] and (work / "_local_hub.py").exists()
    assert "model_name='./models/TinyLlama--TinyLlama-1.1B-Chat-v1.0'" in code[5] and "max_steps=8" in code[5]
    assert (work / "models" / "TinyLlama--TinyLlama-1.1B-Chat-v1.0" / "config.json").exists()
    assert len(changes) == 5 and "RF_TUTORIAL_CHECK" in code[-1]
    error, _ = tutorials.execute(converted, work, timeout=300)
    assert error is None
    check = tutorials.read_check(converted)
    verdict = tutorials.judge(check)
    assert verdict["ok"], verdict
    assert [(r["step"], r["total_steps"]) for r in check["runs"]] == [(8, 8), (8, 8)]
    assert all(r["losses_finite"] and r["max_grad_norm"] > 0 for r in check["runs"])
    assert all("output_dir" not in c["training_args"] for c in check["configs"].values())
    same = {**check, "configs": {1: check["configs"]["1"], 2: check["configs"]["1"]}}
    assert tutorials.judge(same) == {**verdict, "ok": False, "why": "two runs trained the same config"}
    with pytest.raises(ValueError, match="'max_steps=999' not found"):
        tutorials.convert(source, tutorials.Tutorial("fine-tuning/t.ipynb", [("max_steps=999", "x")]), work)
