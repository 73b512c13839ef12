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
        ("thread", ["--max-steps", "4", "--repeats", "1"], "thread-demo"),
        ("memory", ["--model", "demo", "--runs", "1", "2"], "memory-demo"),
        ("ic_ops", ["--trials", "1"], "ic_ops"),
        ("checkpoint", ["--runs", "2", "--num-chunks", "2", "--max-steps", "4", "--repeats", "1"], "checkpoint-demo"),
        ("pruning", ["--seeds", "1", "--configs", "4", "--rows", "64", "--num-chunks", "2"], "pruning"),
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


def test_tutorial_conversion_changes_only_what_it_lists(tmp_path):
    """bench.tutorials on a notebook in the shape of RapidFire AI's (theirs are not copied here): imports, each model
    id to its own local copy, Hub data to local rows, the listed fewer-steps substitutions; a substitution that no
    longer matches is an error, not a silent no-op."""
    import nbformat

    from bench import tutorials

    source = tmp_path / "src"
    (source / "fine-tuning").mkdir(parents=True)
    cells = [
        "from rapidfireai import Experiment\nfrom rapidfireai.automl import List, RFGridSearch",
        "from datasets import load_dataset\nds = load_dataset('openai/gsm8k', 'main')['train'].select(range(128))",
        'a = dict(model_name="Qwen/Qwen2.5-0.5B-Instruct", max_steps=128)\nb = dict(model_name="org/other")',
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbformat.write(nb, source / "fine-tuning" / "t.ipynb")
    work = tmp_path / "work"
    work.mkdir()
    tutorial = tutorials.Tutorial("fine-tuning/t.ipynb", [("max_steps=128", "max_steps=8")])
    converted, changes = tutorials.convert(source, tutorial, work)
    code = [c.source for c in converted.cells]
    assert code[0] == "from rf_notebook import Experiment\nfrom rf_notebook import List, RFGridSearch"
    assert "from _local_hub import load_dataset" in code[1] and (work / "_local_hub.py").exists()
    assert "model_name='./models/Qwen--Qwen2.5-0.5B-Instruct', max_steps=8" in code[2]
    assert "model_name='./models/org--other'" in code[2]
    assert (work / "models" / "org--other" / "config.json").exists()
    assert len(changes) == 6 and "RF_TUTORIAL_CHECK" in code[-1]
    exec(compile(tutorials.LOCAL_HUB, "_local_hub.py", "exec"), hub := {})
    assert set(hub["load_dataset"]("openai/gsm8k", "main")["train"].column_names) == {"question", "answer"}
    with pytest.raises(ValueError, match="'max_steps=999' not found"):
        tutorials.convert(source, tutorials.Tutorial("fine-tuning/t.ipynb", [("max_steps=999", "x")]), work)
