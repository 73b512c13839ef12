"""The panel's Python side without a browser: feed snapshots and deltas, the writer's throttling, the final
snapshot trait, the static HTML fallback, and button messages -> IC ops on a real experiment -> replies."""

from __future__ import annotations

import math
import sys
import threading
import time

import pytest

from rf_notebook._feed import Feed, downsample, run_color
from rf_notebook.store import RunRecord, RunStatus, Store
from rf_notebook.widget import Panel


def store_with_runs(n=2, steps=10):
    store = Store()
    for run_id in range(1, n + 1):
        store.add_run(
            RunRecord(
                run_id,
                f"lr={run_id}e-3",
                "SFT",
                {"training_args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}},
                params={"training_args.learning_rate": run_id * 1e-3, "peft_config.r": 8},
                total_steps=steps,
                chunks_total=2,
                rungs=(steps // 2, steps),
                rows_per_step=8.0,
            )
        )
    return store


def test_snapshot_and_delta_carry_new_points_only():
    store = store_with_runs()
    feed = Feed(store, "exp")
    store.log_metrics(1, 1, 1, {"loss": 2.0})
    first = feed.snapshot()
    assert first["cursor"] == 1 and first["series"] == {"1": {"loss": [[1, 2.0]]}}
    store.log_metrics(1, 2, 1, {"loss": 1.5})
    store.log_metrics(2, 1, 1, {"loss": 3.0, "eval_loss": float("nan")})
    delta = feed.delta(since=first["cursor"])
    assert (delta["from"], delta["to"]) == (1, 4)
    assert delta["series"] == {"1": {"loss": [[2, 1.5]]}, "2": {"loss": [[1, 3.0]], "eval_loss": [[1, None]]}}
    assert [r["latest"] for r in delta["runs"]] == [{"loss": 1.5}, {"loss": 3.0, "eval_loss": None}]
    assert delta["params"] == ["training_args.learning_rate"]  # r is the same for both runs
    assert delta["runs"][0]["samples_per_step"] == 8
    assert delta["runs"][1]["color"] == run_color(2) != run_color(1)
    assert feed.delta(since=4)["series"] == {}


def test_header_progress_eta_and_done():
    store = store_with_runs(n=2, steps=10)
    feed = Feed(store, "exp")
    store.update_run(1, step=5, status=RunStatus.TRAINING)
    header = feed.delta(0)["header"]
    assert header["progress"] == pytest.approx(0.25) and not header["done"] and header["eta_s"] is not None
    assert header["counts"] == {"training": 1, "queued": 1}
    boundaries = feed.delta(0)["boundaries"]
    assert boundaries == {"1": [5], "2": []}
    store.update_run(1, step=10, status=RunStatus.FINISHED)
    store.update_run(2, status=RunStatus.STOPPED)
    header = feed.delta(0)["header"]
    assert header["done"] and header["eta_s"] is None
    assert feed.done()


def test_snapshot_is_downsampled_but_keeps_both_ends():
    store = store_with_runs(n=1, steps=5000)
    for step in range(1, 5001):
        store.log_metrics(1, step, 1, {"loss": 1 / step})
    curve = Feed(store, "exp", max_points=300).snapshot()["series"]["1"]["loss"]
    assert len(curve) == 300 and curve[0] == [1, 1.0] and curve[-1] == [5000, 1 / 5000]
    assert downsample([[1, 1]], 10) == [[1, 1]]


class Recorder:
    """An IC-op service stand-in for the writer: a store, a name, and no ops."""

    def __init__(self, store):
        self.store, self.name = store, "exp"


def recording_panel(store, mode="push", control=None):
    """A panel that records what it sends; `control`: the IC-op service its clicks go to (a real experiment's)."""
    panel = Panel(control or Recorder(store), mode=mode)
    sent = []
    panel._emit = lambda message: sent.append((time.monotonic(), message))
    return panel, sent


def test_writer_sends_at_most_five_deltas_a_second_and_nothing_when_idle():
    store = store_with_runs(n=1, steps=10_000)
    panel, sent = recording_panel(store)
    panel.training_started()
    stop = threading.Event()

    def train():  # a metric row every millisecond
        step = 0
        while not stop.is_set():
            step += 1
            store.log_metrics(1, step, 1, {"loss": 1.0})
            time.sleep(0.001)

    trainer = threading.Thread(target=train)
    trainer.start()
    time.sleep(2.0)
    stop.set()
    trainer.join()
    time.sleep(0.5)
    n_busy = len(sent)
    time.sleep(1.0)  # nothing changes: nothing is sent
    panel.stop_writer()
    assert 4 <= n_busy <= 2.5 * 5 + 2, n_busy
    assert len(sent) == n_busy
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:])]
    assert min(gaps) >= 0.15, gaps
    deltas = [m for _, m in sent]
    assert all(a["to"] == b["from"] for a, b in zip(deltas, deltas[1:]))  # contiguous: no point lost
    assert sum(len(d["series"].get("1", {}).get("loss", [])) for d in deltas) == len(store.metrics())


def test_final_snapshot_trait_and_static_html_when_the_experiment_ends():
    store = store_with_runs(n=2, steps=4)
    panel, _ = recording_panel(store)
    panel.training_started()
    for step in range(1, 5):
        store.log_metrics(1, step, 1, {"loss": 1 / step})
    assert not panel.snapshot.get("header", {}).get("done")
    store.update_run(1, step=4, status=RunStatus.FINISHED)
    store.update_run(2, status=RunStatus.FAILED, error="Traceback ...\nValueError: <img src=x onerror=alert(1)>")
    deadline = time.time() + 3
    while not panel.snapshot["header"]["done"]:
        assert time.time() < deadline, "the final snapshot was not written"
        time.sleep(0.05)
    panel.stop_writer()
    assert panel.snapshot["series"]["1"]["loss"][-1] == [4, 0.25]
    data, _ = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    html = data["text/html"]
    assert "<svg" in html and "<polyline" in html and "<script" not in html
    assert "<img src=x" not in html and "&lt;img src=x" in html


@pytest.mark.parametrize("viewed", [True, False])
def test_final_refresh_keeps_the_widget_only_where_a_view_runs_it(monkeypatch, viewed):
    """nbclient / papermill run no widget JavaScript; their saved outputs must not be a widget view, which nbconvert
    would pick over the static HTML (and draw blank offline)."""
    import IPython.display

    updates = []
    monkeypatch.setattr(IPython.display, "update_display", lambda obj, **kw: updates.append((obj, kw)))
    store = store_with_runs(n=1, steps=2)
    panel, _ = recording_panel(store)
    panel._display_ids += ["fit-cell", "panel-cell"]
    if viewed:
        panel._on_message(panel, {"type": "sync", "id": "v:1"}, [])
    store.log_metrics(1, 1, 1, {"loss": 1.0})
    store.log_metrics(1, 2, 1, {"loss": 0.5})
    store.update_run(1, step=2, status=RunStatus.FINISHED)
    panel.stop_writer()
    assert [kw["display_id"] for _, kw in updates] == ["fit-cell", "panel-cell"]
    for obj, kw in updates:
        if viewed:
            assert obj is panel and not kw.get("raw")
        else:
            assert kw["raw"] and set(obj) == {"text/plain", "text/html"}
            assert obj["text/html"].count("<polyline") == 1 and "finished" in obj["text/html"]
    panel.stop_writer()  # nothing changed since: no second refresh
    assert len(updates) == 2
    panel._display_ids.append("late-cell")  # exp.panel() after the end: refreshed by the next final write
    panel._write_final(ended=True)
    assert [kw["display_id"] for _, kw in updates[2:]] == ["late-cell"]
    if not viewed:  # a live view that speaks up after all (an output scrolled into view late): the widget again
        panel._on_message(panel, {"type": "sync", "id": "v:2"}, [])
        assert [(obj, kw["display_id"]) for obj, kw in updates[3:]] == [
            (panel, "fit-cell"),
            (panel, "panel-cell"),
            (panel, "late-cell"),
        ]


def test_a_sync_answer_ends_where_the_writers_next_delta_starts():
    store = store_with_runs(n=1)
    panel, sent = recording_panel(store)
    panel.training_started()
    store.log_metrics(1, 1, 1, {"loss": 1.0})
    wait = time.time() + 3
    while not sent:
        assert time.time() < wait
        time.sleep(0.01)
    panel.stop_writer()  # no more deltas: the cursor stays where the last one ended
    store.log_metrics(1, 2, 1, {"loss": 0.5})  # logged after the writer's last delta
    panel._on_message(panel, {"type": "sync", "id": "v:1"}, [])
    answer = sent[-1][1]
    assert answer["type"] == "snapshot" and answer["id"] == "v:1"
    assert answer["state"]["cursor"] == sent[0][1]["to"] == 1  # the next delta (from 1) continues it exactly
    assert answer["state"]["series"] == {"1": {"loss": [[1, 1.0]]}}


def test_pull_mode_sends_nothing_unasked_and_answers_pulls():
    store = store_with_runs(n=1)
    panel, sent = recording_panel(store, mode="pull")
    panel.training_started()
    store.log_metrics(1, 1, 1, {"loss": 1.0})
    time.sleep(0.6)
    assert sent == []
    panel._on_message(panel, {"type": "pull", "id": "v:1", "since": 0}, [])
    (_, reply), *_ = sent
    assert reply["type"] == "delta" and reply["id"] == "v:1" and reply["series"] == {"1": {"loss": [[1, 1.0]]}}
    panel._on_message(panel, {"type": "pull", "id": "v:2", "since": "garbage"}, [])
    assert sent[-1][1]["type"] == "snapshot" and sent[-1][1]["id"] == "v:2"
    panel.stop_writer()


# -- button messages on a real experiment (demo model) ---------------------------------------------------------


@pytest.fixture(scope="module")
def running():
    from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
    from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn

    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            training_args=RFSFTConfig(learning_rate=List([3e-3, 1e-3]), per_device_train_batch_size=8, max_steps=400),
        ),
        trainer_type="SFT",
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        exp = Experiment("panel", experiments_dir=tmp)
        exp.run_fit(group, demo_model_fn, arithmetic_dataset("train", n=64), num_chunks=2, seed=0, display=False)
        panel, sent = recording_panel(exp.store, control=exp._control)
        yield exp, panel, sent
        exp.end(wait=False)


def click(panel, sent, **request):
    panel._on_message(panel, {"type": "op", "id": "v:9", **request}, [])
    _, reply = sent[-1]
    assert reply["type"] == "reply" and reply["id"] == "v:9"
    return reply


def status(exp, run_id):
    return exp.store.run(run_id).status


def wait_for(predicate, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline
        time.sleep(0.01)


def test_stop_click_enqueues_an_op_that_the_engine_applies(running):
    exp, panel, sent = running
    reply = click(panel, sent, op="stop", run_id=1)
    assert reply["ok"] and isinstance(reply["op_id"], int)
    op = exp.store.ic_log()[reply["op_id"] - 1]
    assert (op.origin, op.op, op.run_id) == ("panel", "stop", 1)
    wait_for(lambda: status(exp, 1) is RunStatus.STOPPED)
    assert click(panel, sent, op="resume", run_id=1)["ok"]
    wait_for(lambda: status(exp, 1) in (RunStatus.QUEUED, RunStatus.TRAINING))


def test_refusals_come_back_with_the_engines_reason(running):
    exp, panel, sent = running
    reply = click(panel, sent, op="resume", run_id=2)
    assert not reply["ok"] and "run 2" in reply["message"] and "stopped" in reply["message"]
    reply = click(panel, sent, op="stop", run_id=99)
    assert not reply["ok"] and "99" in reply["message"]
    reply = click(panel, sent, op="stop", run_id="1")
    assert not reply["ok"] and "'1'" in reply["message"]
    assert not click(panel, sent, op="explode", run_id=1)["ok"]
    reply = click(panel, sent, op="clone_modify", run_id=1, overrides={"learning_rat": 1e-4}, warm_start=False)
    assert not reply["ok"] and "learning_rat" in reply["message"] and "learning_rate" in reply["message"]
    reply = click(panel, sent, op="clone_modify", run_id=1, overrides={"learning_rate": 1e-4}, warm_start="yes")
    assert not reply["ok"] and "warm_start" in reply["message"]
    assert all(op.outcome != "pending" for op in exp.store.ic_log())


def test_clone_modify_click_adds_a_run_that_trains(running):
    exp, panel, sent = running
    reply = click(panel, sent, op="clone_modify", run_id=2, overrides={"learning_rate": 5e-4}, warm_start=True)
    assert reply["ok"], reply
    new_id = reply["run_id"]
    wait_for(lambda: any(r.run_id == new_id for r in exp.runs()))
    wait_for(lambda: exp.store.run(new_id).step > exp.store.run(2).step - 1 and exp.store.run(new_id).step > 0)
    record = exp.store.run(new_id)
    assert record.params["training_args.learning_rate"] == 5e-4
    assert math.isclose(exp.store.run(2).params["training_args.learning_rate"], 1e-3)


def test_stop_all_stops_every_live_run(running):
    exp, panel, sent = running
    reply = click(panel, sent, op="stop_all")
    assert reply["ok"] and reply["op_ids"]
    assert exp.wait(timeout=60)
    assert all(r.status is not RunStatus.TRAINING for r in exp.runs())
    assert any(r.status is RunStatus.STOPPED for r in exp.runs())


def test_panel_is_one_model_per_experiment(tmp_path, monkeypatch):
    from rf_notebook import Experiment

    shown = []
    monkeypatch.setattr(Panel, "show", lambda self: shown.append(self))
    exp = Experiment("once", experiments_dir=tmp_path)
    exp.panel()
    exp.panel()
    assert len(shown) == 2 and shown[0] is shown[1]


def test_colab_gets_pull_mode(monkeypatch):
    import types

    from rf_notebook.widget import _default_mode

    monkeypatch.delenv("RF_NOTEBOOK_PANEL_MODE", raising=False)
    assert _default_mode() == "push"
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert _default_mode() == "pull"
    monkeypatch.setenv("RF_NOTEBOOK_PANEL_MODE", "push")
    assert _default_mode() == "push"


def test_static_picture_shows_what_each_trainer_type_is_judged_by():
    from rf_notebook.widget import _headline_metrics

    def snap(*names):
        return {"series": {"1": {name: [[1, 0.5]] for name in names}}}

    assert _headline_metrics(snap("loss", "eval_loss")) is None
    assert _headline_metrics(snap("loss", "reward", "eval_reward", "kl")) == ["reward", "eval_reward"]
    assert _headline_metrics(snap("loss", "rewards/accuracies", "eval_rewards/accuracies")) == [
        "loss",
        "eval_rewards/accuracies",
    ]


def test_after_rows_are_dropped_views_get_the_whole_state_not_a_delta():
    """A run that continued from its last checkpoint (its worker was lost) logs those steps again: the points the
    views drew after the checkpoint must go, so the writer sends a snapshot, and a pull from before gets one."""
    store = store_with_runs(n=1)
    panel, sent = recording_panel(store)
    panel.training_started()
    for step in (1, 2, 3):
        store.log_metrics(1, step, 1, {"loss": 1.0 / step})

    def wait_for(predicate):
        deadline = time.time() + 3
        while not predicate():
            assert time.time() < deadline, sent
            time.sleep(0.01)

    wait_for(lambda: sent and sent[-1][1].get("to") == 3)
    store.drop_metrics_after(1, 1)
    store.log_metrics(1, 2, 1, {"loss": 0.4})
    wait_for(lambda: sent[-1][1]["type"] == "snapshot")
    panel.stop_writer()
    state = sent[-1][1]["state"]
    assert state["series"] == {"1": {"loss": [[1, 1.0], [2, 0.4]]}} and state["cursor"] == 5
    panel._on_message(panel, {"type": "pull", "id": "v:1", "since": 3}, [])  # a pull-mode view from before
    assert sent[-1][1]["type"] == "snapshot" and sent[-1][1]["state"]["series"] == state["series"]
    panel._on_message(panel, {"type": "pull", "id": "v:2", "since": 5}, [])
    assert sent[-1][1]["type"] == "delta" and sent[-1][1]["series"] == {}
