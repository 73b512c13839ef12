"""The Experiment facade on the demo model: what a user calls, sees and takes away."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, MODEL_DIR, arithmetic_dataset, demo_model_fn, exact_match_metrics
from rf_notebook.store import RunStatus


def sweep(max_steps=8, batch=8, model_name=DEMO_MODEL, **lora):
    return RFGridSearch(
        RFModelConfig(
            model_name=model_name,
            peft_config=RFLoraConfig(r=List([2, 4]), lora_alpha=8, target_modules="all-linear", **lora),
            training_args=RFSFTConfig(learning_rate=3e-3, per_device_train_batch_size=batch, max_steps=max_steps),
            compute_metrics=exact_match_metrics,
        ),
        trainer_type="SFT",
    )


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=16)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """One small finished experiment shared by the read-only tests below."""
    exp = Experiment("shared", experiments_dir=tmp_path_factory.mktemp("exp"))
    exp.run_fit(sweep(), demo_model_fn, *data, num_chunks=2, seed=1)
    assert exp.wait(timeout=300)
    yield exp
    exp.end(wait=False)


def test_run_fit_returns_while_training_goes_on_in_the_background(data, tmp_path):
    exp = Experiment("bg", experiments_dir=tmp_path)
    start = time.time()
    exp.run_fit(sweep(max_steps=48), demo_model_fn, *data, num_chunks=4, seed=0)
    returned = time.time() - start
    statuses = {r.status for r in exp.runs()}
    assert statuses & {RunStatus.QUEUED, RunStatus.TRAINING}, statuses  # not all done when run_fit returns
    assert _schedulers() >= 1
    assert exp.wait(timeout=300)
    assert {r.status for r in exp.runs()} == {RunStatus.FINISHED}
    assert time.time() - start > returned
    threads = _schedulers()
    exp.end(wait=False)
    assert _schedulers() == threads - 1


def test_wait_outside_a_notebook_shows_one_live_progress_line_and_nothing_else(data, tmp_path, capsys):
    exp = Experiment("progress", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=24), demo_model_fn, *data, num_chunks=3, seed=0)  # 3 epochs of 3 chunks
    assert exp.wait(timeout=300, progress=True)
    out, err = capsys.readouterr()
    assert out == ""  # no per-step dicts, no data set map bars
    frames = [f.strip() for f in re.split(r"[\r\n]", err) if f.strip()]
    assert frames and all(f.startswith("progress ") for f in frames), err
    assert re.search(r"100%\|.*\| chunks 18/18 · 2 finished \[\d\d:\d\d<00:00\]$", frames[-1]), frames[-1]
    assert len({re.search(r"(\d+)%", f).group(1) for f in frames}) >= 3, "the line did not move while training"
    exp.end(wait=False)


def test_end_after_run_fit_trains_every_run_to_its_end_as_rapidfire_users_expect(data, tmp_path, capsys):
    """RapidFire AI's tutorials call `experiment.end()` right after a `run_fit` that blocked; here run_fit returns
    at once, so end() waits for the runs (saying so) instead of stopping them at step 0."""
    exp = Experiment("ends", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=8), demo_model_fn, *data, num_chunks=2, seed=0, display=False)
    exp.end()
    assert capsys.readouterr().out.startswith("ends: waiting for 2 runs to finish training before ending")
    assert [(r.status, r.step) for r in exp.runs()] == [(RunStatus.FINISHED, 8)] * 2
    assert sorted(exp.get_results().groupby("run_id").step.max()) == [8, 8]
    assert not exp._engine.alive


def test_end_without_waiting_and_stop_all_stop_the_runs_where_they_are(data, tmp_path):
    exp = Experiment("stops", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=400), demo_model_fn, *data, num_chunks=2, seed=0, display=False)
    deadline = time.time() + 120
    while exp.get_results().empty:  # what is there while training: the first steps
        assert time.time() < deadline
        time.sleep(0.05)
    op_ids = exp.stop_all()
    assert len(op_ids) == 2 and exp.wait(timeout=60)
    assert {r.status for r in exp.runs()} == {RunStatus.STOPPED} and all(r.step < 400 for r in exp.runs())
    assert list(exp.ic_log().op) == ["stop", "stop"] and set(exp.ic_log().outcome) == {"applied"}
    exp.resume(1)
    exp.end(wait=False)  # ends at once: the resumed run is stopped where it is
    assert exp.runs()[0].status is RunStatus.STOPPED and exp.runs()[0].step < 400


def test_the_progress_line_is_on_where_a_person_watches_a_terminal():
    import io

    from rf_notebook._progress import wanted

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert wanted(None, in_kernel=False, stream=Terminal())
    assert not wanted(None, in_kernel=False, stream=io.StringIO())  # a pipe, a CI log
    assert not wanted(None, in_kernel=True, stream=Terminal())  # the panel shows progress there
    assert wanted(True, in_kernel=True) and not wanted(False, in_kernel=False, stream=Terminal())


def test_runs_results_and_best_run(finished):
    runs = finished.runs()
    assert [(r.run_id, r.name, r.status) for r in runs] == [
        (1, "r=2", RunStatus.FINISHED),
        (2, "r=4", RunStatus.FINISHED),
    ]
    assert runs[0].config["peft_config"] == {"r": 2, "lora_alpha": 8, "target_modules": "all-linear"}
    assert runs[0].config["training_args"]["seed"] == 1 and runs[0].chunks_done == runs[0].chunks_total == 2
    results = finished.results()
    assert list(results.columns) == ["run_id", "run_name", "step", "chunk", "metric", "value", "wall_time"]
    evals = results[results.metric == "eval_exact_match"]
    assert sorted(zip(evals.run_id, evals.step, evals.chunk)) == [(1, 4, 1), (1, 8, 2), (2, 4, 1), (2, 8, 2)]
    losses = results[(results.metric == "loss") & (results.run_id == 1)]
    assert losses.step.tolist() == list(range(1, 9)) and losses.chunk.tolist() == [1] * 4 + [2] * 4
    best = finished.best_run("eval_loss", "min")
    last = results[(results.metric == "eval_loss") & (results.step == 8)].set_index("run_id").value
    assert best.run_id == last.idxmin()
    assert finished.best_run("eval_exact_match", "max").run_id in (1, 2)
    # compute_metrics' own name (RapidFire AI's: "rougeL", not "eval_rougeL") names the same metric
    assert finished.best_run("exact_match", "max").run_id == finished.best_run("eval_exact_match", "max").run_id
    assert finished.best_run("loss", "min").run_id in (1, 2)  # a logged name is taken as it is
    assert (
        finished.leaderboard("exact_match", "max").run_id.tolist()
        == finished.leaderboard("eval_exact_match", "max").run_id.tolist()
    )
    with pytest.raises(ValueError, match="no run has logged metric 'bleu'"):
        finished.best_run("bleu")
    board = finished.leaderboard()
    assert board.eval_loss.is_monotonic_increasing and len(board) == 2


def test_export_is_a_standard_peft_adapter(finished, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    out = finished.export(2, tmp_path / "winner")
    saved = json.loads((out / "rf_config.json").read_text())
    assert saved["name"] == "r=4" and saved["config"]["peft_config"]["r"] == 4
    base, _ = demo_model_fn(None)
    loaded = PeftModel.from_pretrained(base, out)
    weights = load_file(out / "adapter_model.safetensors")
    assert loaded.peft_config["default"].r == 4
    for key, value in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(value, weights[key])
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained, not the zero init
    with pytest.raises(KeyError, match="no run with id 99"):
        finished.export(99, tmp_path / "nope")


def test_default_loader_reads_a_local_model_folder(data, tmp_path):
    exp = Experiment("local", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=4, model_name=str(MODEL_DIR)), None, *data, num_chunks=1, seed=0)
    assert exp.wait(timeout=300)
    assert {r.status for r in exp.runs()} == {RunStatus.FINISHED}
    exp.end(wait=False)


def test_create_model_fn_is_called_once_per_distinct_base(data, tmp_path):
    calls = []

    def counting(config):
        calls.append(config["model_name"])
        return demo_model_fn(config)

    exp = Experiment("once", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=4), counting, *data, num_chunks=1, seed=0)
    exp.wait(timeout=300)
    exp.end(wait=False)
    assert calls == [DEMO_MODEL]


def test_a_compute_metrics_that_raises_costs_its_metrics_not_the_run(data, tmp_path, caplog):
    """As in RapidFire AI: an evaluate.load that cannot reach the Hub, a bug in the metric. (A run that fails for
    real does not take the others down either: tests/test_faults.py.)"""

    def metrics_that_break(eval_pred):
        raise ConnectionError("cannot reach the metric's script offline")

    group = RFGridSearch(
        List(
            [
                RFModelConfig(
                    DEMO_MODEL,
                    peft_config=RFLoraConfig(r=2, target_modules="all-linear"),
                    training_args=RFSFTConfig(per_device_train_batch_size=8, max_steps=4),
                    compute_metrics=metrics_that_break,
                ),
                RFModelConfig(
                    DEMO_MODEL,
                    peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
                    training_args=RFSFTConfig(per_device_train_batch_size=8, max_steps=4),
                    compute_metrics=exact_match_metrics,
                ),
            ]
        ),
        trainer_type="SFT",
    )
    exp = Experiment("isolation", experiments_dir=tmp_path)
    with caplog.at_level("WARNING", logger="rf_notebook"):
        exp.run_fit(group, demo_model_fn, *data, num_chunks=2, seed=0)
        assert exp.wait(timeout=300)
    broken, ok = exp.runs()
    assert (broken.status, broken.step, ok.status, ok.step) == (RunStatus.FINISHED, 4, RunStatus.FINISHED, 4)
    assert broken.warning == (
        "metrics_that_break raised ConnectionError: cannot reach the metric's script offline (its metrics are skipped)"
    )
    assert ok.warning is None
    said = [r for r in caplog.records if "metrics_that_break raised" in r.getMessage()]
    assert len(said) == 1 and "ConnectionError" in said[0].exc_text  # the traceback, once for the run
    metrics = exp.results().groupby("run_id").metric.apply(set)
    assert "eval_loss" in metrics[1] and "eval_exact_match" not in metrics[1]  # the trainer's own eval still runs
    assert "eval_exact_match" in metrics[2]
    from rf_notebook._feed import Feed

    assert Feed(exp.store, exp.name).snapshot()["runs"][0]["warning"] == broken.warning  # what the panel shows
    exp.end(wait=False)


# -- bad input: refused before any training, with the value named ------------------------------------------------


def _schedulers() -> int:
    return sum(t.name == "rf_notebook-scheduler" for t in threading.enumerate())


def _rows(n, **columns):
    import datasets

    return datasets.Dataset.from_dict({k: [v] * n for k, v in columns.items()})


@pytest.mark.parametrize(
    "kwargs, error, message, failed_runs",  # failed_runs: runs recorded before the error, each marked failed
    [
        ({"num_chunks": 0}, ValueError, r"`num_chunks` is 0, but must be an int >= 1", 0),
        (
            {"num_chunks": 9},
            ValueError,
            r"`num_chunks` is 9, but run 'r=2' has only 8 optimizer steps per epoch of 64 rows",
            0,
        ),
        (
            {"train_dataset": _rows(8, question="1+1", answer="2")},
            ValueError,
            r"the train data set has columns \['question', 'answer'\], but SFT needs prompt\+completion or messages or text",
            0,
        ),
        ({"train_dataset": _rows(0, text="x")}, ValueError, "the train data set is empty", 0),
        ({"eval_dataset": [1, 2, 3]}, TypeError, "the eval data set is a list, but must be a datasets.Dataset", 0),
        # the model is built when training starts: both runs of the sweep are recorded by then
        ({"create_model_fn": lambda c: "model"}, TypeError, "create_model_fn returned str, but must return a", 2),
        (
            {"create_model_fn": lambda c: (object(), None)},
            TypeError,
            "create_model_fn returned a object as the model, but must return a transformers PreTrainedModel",
            2,
        ),
        ({"create_model_fn": 42}, TypeError, "`create_model_fn` is 42, but must be callable or None", 0),
        ({"seed": "0"}, TypeError, r"`seed` is '0', but must be an int", 0),
        ({"param_config": "grid"}, TypeError, "run_fit takes an RFGridSearch or RFRandomSearch, but got str", 0),
    ],
)
def test_bad_run_fit_arguments(kwargs, error, message, failed_runs, data, tmp_path):
    args = {
        "param_config": sweep(),
        "create_model_fn": demo_model_fn,
        "train_dataset": data[0],
        "eval_dataset": data[1],
        "num_chunks": 2,
        "seed": 0,
        **kwargs,
    }
    exp = Experiment("bad", experiments_dir=tmp_path)
    before = _schedulers()
    with pytest.raises(error, match=message):
        exp.run_fit(**args)
    assert _schedulers() == before  # no thread left behind
    runs = exp.runs()
    assert len(runs) == failed_runs, runs  # refused before any run is recorded, or failed with every run recorded
    for run in runs:  # nothing left looking alive, and the panel says why
        assert run.status is RunStatus.FAILED and re.search(message, run.error or ""), run


def test_an_invalid_trl_value_names_the_run(data, tmp_path):
    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL, peft_config=RFLoraConfig(r=2), training_args=RFSFTConfig(lr_scheduler_type="bogus", max_steps=2)
        )
    )
    with pytest.raises(ValueError, match=r"run 'run 1' has an invalid config: .*bogus"):
        Experiment("bad", experiments_dir=tmp_path).run_fit(group, demo_model_fn, *data, num_chunks=1)


@pytest.mark.parametrize("name", ["", "../up", "a/b", "-lead", "x" * 101, "sp ace", None])
def test_unsafe_experiment_names(name):
    with pytest.raises(ValueError, match="is not a safe directory name"):
        Experiment(name)


def test_a_second_run_fit_while_one_is_active_is_refused(data, tmp_path):
    exp = Experiment("busy", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=48), demo_model_fn, *data, num_chunks=4, seed=0)
    with pytest.raises(RuntimeError, match="experiment 'busy' is already running a run_fit"):
        exp.run_fit(sweep(), demo_model_fn, *data, num_chunks=2)
    other = Experiment("other", experiments_dir=tmp_path)
    with pytest.raises(RuntimeError, match="experiment 'busy' is still training in this process"):
        other.run_fit(sweep(), demo_model_fn, *data, num_chunks=2)
    exp.end(wait=False)
    assert {r.status for r in exp.runs()} <= {RunStatus.FINISHED, RunStatus.STOPPED}


def test_an_experiment_nobody_holds_is_still_seen_while_it_trains(data, tmp_path):
    """`Experiment(...).run_fit(...)` without keeping the object: the process's checks still see it training."""
    import gc
    import weakref

    exp = Experiment("unheld", experiments_dir=tmp_path)
    exp.run_fit(sweep(max_steps=48), demo_model_fn, *data, num_chunks=4, seed=0, display=False)
    held = weakref.ref(exp)
    del exp
    gc.collect()
    assert held() is not None
    with pytest.raises(RuntimeError, match="experiment 'unheld' is training in this process"):
        Experiment("unheld", experiments_dir=tmp_path)
    held().end(wait=False)


def test_formatting_func_turns_raw_rows_into_training_text(tmp_path):
    import datasets

    raw = datasets.Dataset.from_dict({"a": list(range(32)), "b": list(range(32, 64))})

    def as_text(row):
        return f"{row['a']}+{row['b']}={row['a'] + row['b']}\n"

    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=2, target_modules="all-linear"),
            training_args=RFSFTConfig(per_device_train_batch_size=8, max_steps=4),
            formatting_func=as_text,
        ),
    )
    exp = Experiment("formatted", experiments_dir=tmp_path)
    exp.run_fit(group, demo_model_fn, raw, raw, num_chunks=2, seed=0)
    assert exp.wait(timeout=300)
    (run,) = exp.runs()
    assert run.status is RunStatus.FINISHED, run.error
    assert run.config["formatting_func"].endswith("as_text")
    assert len(exp.results().query("metric == 'eval_loss'")) == 2
    exp.end(wait=False)
