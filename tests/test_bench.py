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
