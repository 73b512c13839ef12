"""RapidFire AI's own fit tutorials, converted mechanically and executed as notebooks in a real kernel.

    python -m bench.tutorials --source <rapidfireai checkout>/tutorial_notebooks

Reads RapidFire AI's notebooks from a checkout of its repository (they are not copied into this one), applies only
the mechanical changes below, listed per tutorial in the report, runs each top to bottom with nbclient (no `wait()`
added: the tutorials end with `experiment.end()`), then reads the experiment it left on disk and checks that every
run trained all its steps and that the runs' configs differ where the tutorial meant them to. Writes
bench/results/tutorials.json and a table in BENCHMARKS.md.

The mechanical changes, and nothing else:
- imports: `rapidfireai` / `rapidfireai.automl` -> `rf_notebook`;
- Hugging Face model ids -> copies of the embedded demo model, one folder per id (loaded by the tutorial's own
  `create_model_fn`; two ids stay two bases);
- `datasets.load_dataset` of a Hub data set -> local rows with the same columns and formats (`_local_hub.py`,
  written next to the notebook: arithmetic questions in the tutorial data set's shape);
- fewer rows and steps, shorter generations (a CPU and a 1M-parameter model), each substitution named.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import header, save, write_section
from rf_notebook.demo import MODEL_DIR

# A Hub model id assigned to `model_name=` or `MODEL_NAME_OR_PATH =`
MODEL_ID = re.compile(r"""((?:model_name|MODEL_NAME_OR_PATH)\s*=\s*)(["'])([\w.-]+/[\w.-]+)\2""")
IMPORTS = [
    ("from rapidfireai.automl import", "from rf_notebook import"),
    ("from rapidfireai import", "from rf_notebook import"),
]


@dataclass(frozen=True)
class Tutorial:
    path: str  # under tutorial_notebooks/
    fewer: list[tuple[str, str]] = field(default_factory=list)  # (old, new): each must occur in the notebook
    # (old, new, why): not mechanical; a config the tutorial's own TRL cannot train either, refused up front here
    fixes: list[tuple[str, str, str]] = field(default_factory=list)


TUTORIALS = [
    Tutorial(
        "fine-tuning/rf-tutorial-sft-chatqa-lite.ipynb",
        [
            ("max_steps=128", "max_steps=32"),
            ('"max_new_tokens": 256', '"max_new_tokens": 8'),
            ("select(range(128,152))", "select(range(128,136))"),
        ],
    ),
    Tutorial(
        "fine-tuning/rf-tutorial-sft-chatqa.ipynb",
        [
            ("select(range(5000))", "select(range(256))"),
            ("select(range(5000,5200))", "select(range(256,264))"),
            ('"max_new_tokens": 256', '"max_new_tokens": 8'),
        ],
    ),
    Tutorial(
        "post-training/rf-tutorial-dpo-alignment-lite.ipynb",
        [("select(range(128))", "select(range(32))")],
        [
            (
                "dpo_config_2.label_smoothing = 0.5",
                "dpo_config_2.label_smoothing = 0.4",
                "TRL's robust loss divides by 1 - 2 * label_smoothing: 0.5 is NaN at step 1 in every TRL version "
                "(TRL only warns); rf_notebook refuses it before training, naming the value",
            )
        ],
    ),
    Tutorial(
        "post-training/rf-tutorial-grpo-mathreasoning-lite.ipynb",
        [
            ('split="train").select(range(128))', 'split="train").select(range(8))'),
            ('split="test").select(range(24))', 'split="test").select(range(4))'),
            ("max_completion_length=256", "max_completion_length=16"),
        ],
    ),
]

# Local stand-ins for the Hub data sets the tutorials load, with their columns and formats.
LOCAL_HUB = '''"""Local rows in the shape of the Hub data sets RapidFire AI's tutorials load (no network here)."""
import random

from datasets import Dataset, DatasetDict

_PAIRS = [(a, b) for a in range(100) for b in range(100)]
random.Random(0).shuffle(_PAIRS)


def _bitext(n=512):
    return Dataset.from_list([
        {"flags": "B", "instruction": f"What is {a}+{b}?", "category": "MATH", "intent": "add",
         "response": f"{a}+{b} is {a + b}."}
        for a, b in _PAIRS[:n]
    ])


def _ultrafeedback(n=256):
    rows = []
    for a, b in _PAIRS[:n]:
        user = {"role": "user", "content": f"{a}+{b}"}
        rows.append({
            "chosen": [user, {"role": "assistant", "content": str(a + b)}],
            "rejected": [user, {"role": "assistant", "content": str(a + b + 1)}],
            "score_chosen": 8.0, "score_rejected": 2.0,
        })
    return Dataset.from_list(rows)


def _gsm8k(offset, n):
    return Dataset.from_list([
        {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
         "answer": f"He has {a} + {b} = {a + b} apples.\\n#### {a + b}"}
        for a, b in _PAIRS[offset:offset + n]
    ])


def load_dataset(path, name=None, split=None, **kwargs):
    sets = {
        "bitext/Bitext-customer-support-llm-chatbot-training-dataset": lambda: DatasetDict(train=_bitext()),
        "trl-lib/ultrafeedback_binarized": lambda: DatasetDict(train=_ultrafeedback(), test=_ultrafeedback(64)),
        "openai/gsm8k": lambda: DatasetDict(train=_gsm8k(0, 512), test=_gsm8k(512, 128)),
    }
    if path not in sets:
        raise ValueError(f"no local stand-in for the Hub data set {path!r}")
    found = sets[path]()
    return found if split is None else found[split]
'''

CHECK = """import json as _json
from rf_notebook.fields import OWNED_FIELDS as _OWNED
_results = experiment.get_results()
def _learned(run_id):
    rows = _results[_results.run_id == run_id]
    losses = rows["loss"].dropna() if "loss" in rows else []
    norms = rows["grad_norm"].dropna() if "grad_norm" in rows else []
    finite = bool(len(losses)) and bool(losses.apply(lambda v: v == v and abs(v) != float("inf")).all())
    return {"losses_finite": finite, "max_grad_norm": float(norms.max()) if len(norms) else None}
print("RF_TUTORIAL_CHECK " + _json.dumps({
    "runs": [{**{k: v for k, v in vars(r).items() if k not in ("config", "params")}, **_learned(r.run_id)}
             for r in experiment.runs()],
    # what each run trained with, less what the experiment sets itself (each run's own folder)
    "configs": {r.run_id: {**r.config, "training_args": {k: v for k, v in r.config["training_args"].items()
                                                         if k not in _OWNED}} for r in experiment.runs()},
    "metrics": sorted(_results.columns),
}, default=str))
"""


def convert(source: Path, tutorial: Tutorial, folder: Path) -> tuple[Any, list[str]]:
    """The tutorial's notebook with only the mechanical changes, and the list of those changes; the local models
    and data it reads are written to `folder`, where it runs."""
    import nbformat

    nb = nbformat.read(source / tutorial.path, as_version=4)
    changes: list[str] = []

    def substitute(old: str, new: str, why: str, required: bool = True) -> None:
        hits = 0
        for cell in nb.cells:
            if cell.cell_type == "code" and old in cell.source:
                hits += cell.source.count(old)
                cell.source = cell.source.replace(old, new)
        if hits:
            changes.append(f"{why}: {old!r} -> {new!r} (x{hits})")
        elif required:
            raise ValueError(f"{tutorial.path}: {old!r} not found; the tutorial changed, update bench/tutorials.py")

    for old, new in IMPORTS:
        substitute(old, new, "import", required=False)
    # each model id -> its own copy of the demo model, so that runs on different bases stay different runs
    ids = sorted({m[2] for c in nb.cells if c.cell_type == "code" for m in MODEL_ID.findall(c.source)})
    for model_id in ids:
        local = f"./models/{model_id.replace('/', '--')}"
        if not (folder / local).exists():
            shutil.copytree(MODEL_DIR, folder / local)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.source = MODEL_ID.sub(
                    lambda m, local=local, model_id=model_id: m[1] + repr(local) if m[3] == model_id else m[0],
                    cell.source,
                )
        changes.append(f"model: {model_id!r} -> {local!r} (a copy of the demo model)")
    hub = re.compile(r"^(from datasets import .*\bload_dataset\b.*)$", re.M)
    for cell in nb.cells:
        if cell.cell_type == "code" and hub.search(cell.source):
            cell.source = hub.sub(r"\1\nfrom _local_hub import load_dataset  # Hub data -> local rows", cell.source)
            changes.append("data: datasets.load_dataset -> _local_hub.load_dataset (same columns, local rows)")
    for old, new in tutorial.fewer:
        substitute(old, new, "fewer")
    for old, new, why in tutorial.fixes:
        substitute(old, new, f"FIX, not mechanical ({why})")
    if any("rapidfireai" in c.source for c in nb.cells if c.cell_type == "code"):
        raise ValueError(f"{tutorial.path}: a rapidfireai reference is left after the import changes")
    (folder / "_local_hub.py").write_text(LOCAL_HUB)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK))  # the harness's read-out, after the tutorial's last cell
    return nb, changes


def execute(nb: Any, folder: Path, timeout: int) -> tuple[str | None, float]:
    """Run the notebook top to bottom in a fresh python3 kernel in `folder`; the first error, and the seconds."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    start = time.perf_counter()
    try:
        resources = {"metadata": {"path": str(folder)}}
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
        error = None
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1]
    return error, time.perf_counter() - start


def read_check(nb: Any) -> dict[str, Any] | None:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for line in out.get("text", "").splitlines():
                if line.startswith("RF_TUTORIAL_CHECK "):
                    return json.loads(line.removeprefix("RF_TUTORIAL_CHECK "))
    return None


def judge(check: dict[str, Any] | None) -> dict[str, Any]:
    """Every run finished with all its steps; the configs pairwise different (the tutorials' variants)."""
    if check is None:
        return {"ok": False, "why": "the notebook did not reach its end"}
    runs = check["runs"]
    unfinished = [
        r for r in runs if r["status"] != "finished" or r["step"] != r["total_steps"] or not r["losses_finite"]
    ]
    configs = [json.dumps(c, sort_keys=True) for c in check["configs"].values()]
    same = len(set(configs)) < len(configs)
    why = []
    if not runs:
        why.append("no runs")
    if unfinished:
        why.append(
            "unfinished: "
            + ", ".join(
                f"{r['run_id']} {r['status']} {r['step']}/{r['total_steps']} {r['error'] or ''}".strip()
                for r in unfinished
            )
        )
    if same:
        why.append("two runs trained the same config")
    warnings = sorted({r["warning"] for r in runs if r.get("warning")})
    # Whether the adapters moved at all: a zero gradient throughout (e.g. GRPO whose rewards never differ within a
    # group, as with the demo model on a task it cannot do) trains every step and changes nothing. Reported.
    learned = [bool(r["max_grad_norm"]) for r in runs]
    return {"ok": not why, "why": "; ".join(why), "warnings": warnings, "learned": learned}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="RapidFire AI's tutorial_notebooks folder")
    parser.add_argument("--only", default="", help="run only tutorials whose path contains this")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--keep", type=Path, help="write the executed notebooks here")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    result = header("tutorials", argv) | {"source": str(args.source), "tutorials": []}
    for tutorial in TUTORIALS:
        if args.only not in tutorial.path:
            continue
        with tempfile.TemporaryDirectory() as folder:
            nb, changes = convert(args.source, tutorial, Path(folder))
            error, seconds = execute(nb, Path(folder), args.timeout)
        if args.keep:
            import nbformat

            args.keep.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.keep / Path(tutorial.path).name)
        check = read_check(nb)
        verdict = judge(check)
        if error:
            verdict = {**verdict, "ok": False, "why": f"{error}; {verdict['why']}".rstrip("; ")}
        row = {
            "tutorial": tutorial.path,
            "changes": changes,
            "seconds": round(seconds, 1),
            **verdict,
            "runs": (check or {}).get("runs", []),
            "metrics": (check or {}).get("metrics", []),
        }
        result["tutorials"].append(row)
        print(f"{tutorial.path}: {'ok' if row['ok'] else 'FAILED ' + row['why']} ({seconds:.0f} s)", file=sys.stderr)
    if args.only:
        return result
    save("tutorials", result)
    rows = [
        [
            Path(t["tutorial"]).stem,
            "yes" if t["ok"] else f"no: {t['why']}",
            ", ".join(f"{r['step']}/{r['total_steps']}" for r in t["runs"]),
            f"{sum(t.get('learned', []))} of {len(t['runs'])}",
            sum(not c.startswith("FIX") for c in t["changes"]),
            "; ".join(c for c in t["changes"] if c.startswith("FIX")) or "none",
            "; ".join(t.get("warnings", [])) or "none",
            t["seconds"],
        ]
        for t in result["tutorials"]
    ]
    write_section(
        "tutorials",
        "RapidFire AI's tutorials",
        f"`{result['command']}` ({result['date']}, {result['machine']}): each tutorial converted mechanically "
        "(imports, model ids -> copies of the demo model, Hub data -> local rows of the same columns, fewer rows and "
        "steps; "
        "every change is listed in bench/results/tutorials.json) and executed top to bottom in a kernel, with no "
        "`wait()` added. Trained: every run finished all its steps with finite losses, and no two runs trained the "
        "same config (the experiment's own fields, such as each run's folder, left out of the comparison).",
        [
            "tutorial",
            "trained",
            "steps per run",
            "runs with a nonzero gradient",
            "mechanical changes",
            "other changes",
            "warnings",
            "seconds",
        ],
        rows,
    )
    return result


if __name__ == "__main__":
    main()
