"""Trackers: every run in MLflow, TensorBoard and Trackio, live, read back with each tool's own reader and compared
with `exp.results()` row by row; restarts continue the same tracker runs; a failing tracker never stops training."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import pytest

# Trackio keeps its projects in TRACKIO_DIR, read once when it is imported: a folder of this test session's own.
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="trackio-"))

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig  # noqa: E402
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn  # noqa: E402
from rf_notebook.store import RunStatus  # noqa: E402
from rf_notebook.tracking import MLflow, Sink, TensorBoard, Trackio  # noqa: E402
from rf_notebook.tracking._tensorboard import TAGS_TAG  # noqa: E402


def group(max_steps=16):
    return RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=List([2, 4]), lora_alpha=8, target_modules="all-linear"),
            training_args=RFSFTConfig(
                learning_rate=3e-3,
                per_device_train_batch_size=8,
                max_steps=max_steps,
                eval_strategy="steps",
                eval_steps=8,
            ),
        ),
        trainer_type="SFT",
    )


@pytest.fixture(scope="module")
def data():
    return arithmetic_dataset("train", n=64), arithmetic_dataset("eval", n=16)


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# -- each tool's own reader -> {run name: {metric: [(step, value)]}} and {run name: tags} ----------------------------


def mlflow_client(exp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{exp.path.resolve() / 'mlflow.db'}")


def read_mlflow(client, experiment):
    found = client.get_experiment_by_name(experiment)
    metrics, tags, params, status = {}, {}, {}, {}
    for run in client.search_runs([found.experiment_id]):
        name = run.info.run_name
        assert name not in metrics, f"two MLflow runs named {name!r}"
        metrics[name] = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
        }
        tags[name], params[name], status[name] = run.data.tags, run.data.params, run.info.status
    return metrics, tags, params, status


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, tags = {}, {}
    for run_dir in sorted(folder.iterdir()):
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        texts = acc.Tensors(f"{TAGS_TAG}/text_summary")
        latest = json.loads(texts[-1].tensor_proto.string_val[0])
        name = run_dir.name
        metrics[name] = {t: sorted((e.step, e.value) for e in acc.Scalars(t)) for t in acc.Tags()["scalars"]}
        tags[name] = latest
    return metrics, tags


def read_trackio(project, exp):
    from trackio.sqlite_storage import SQLiteStorage

    metrics, config = {}, {}
    uid = exp.store.meta("uid")
    for record in exp.runs():
        key = f"{uid}-{record.run_id}"
        rows = SQLiteStorage.get_logs(project, record.name, run_id=key)
        series = {}
        for row in rows:
            for name, value in row.items():
                if name not in ("step", "timestamp"):
                    series.setdefault(name, []).append((row["step"], value))
        metrics[record.name] = {k: sorted(v) for k, v in series.items()}
        config[record.name] = SQLiteStorage.get_run_config(project, record.name, run_id=key)
    return metrics, config


def expected(exp):
    """exp.results() as {run name: {metric: [(step, value)]}}, plus `samples` at every step a run logged."""
    runs = {r.run_id: r for r in exp.runs()}
    out = {}
    for row in exp.results().itertuples():
        out.setdefault(row.run_name, {}).setdefault(row.metric, []).append((row.step, row.value))
    for record in runs.values():
        steps = sorted({s for series in out.get(record.name, {}).values() for s, _ in series})
        out.setdefault(record.name, {})["samples"] = [(s, s * record.rows_per_step) for s in steps]
    return {name: {k: sorted(v) for k, v in series.items()} for name, series in out.items()}


def assert_same(got, want, rel=0.0):
    assert set(got) == set(want)
    for name in want:
        assert set(got[name]) == set(want[name]), name
        for metric, points in want[name].items():
            steps = [s for s, _ in got[name][metric]]
            assert steps == [s for s, _ in points], (name, metric)  # each step once: no duplicates, no gaps
            for (_, a), (_, b) in zip(got[name][metric], points):
                assert a == pytest.approx(b, rel=rel, abs=0 if rel == 0 else 1e-30) or (math.isnan(a) and math.isnan(b))


# -- the tests -----------------------------------------------------------------------------------------------------


def test_every_run_metric_and_tag_reaches_each_tracker_live(data, tmp_path):
    exp = Experiment("tracked", experiments_dir=tmp_path, trackers=["mlflow", "tensorboard", Trackio("tracked-a")])
    exp.run_fit(group(max_steps=48), demo_model_fn, *data, num_chunks=3, seed=0, display=False)
    client = mlflow_client(exp)

    def logged_live():  # metrics in MLflow while the run still trains: logged as they come, not at the end
        if not (exp.path / "mlflow.db").exists() or client.get_experiment_by_name("tracked") is None:
            return False
        return any(m for m in read_mlflow(client, "tracked")[0].values())

    wait_for(logged_live)
    assert exp.training
    exp.stop(2)
    wait_for(lambda: read_mlflow(client, "tracked")[1].get("r=4", {}).get("rf_notebook.status") == "stopped")
    assert read_mlflow(client, "tracked")[3]["r=4"] == "KILLED"
    clone = exp.clone_modify(1, {"learning_rate": 1e-3}, warm_start=True)
    exp.resume(2)
    assert exp.wait(timeout=300)
    runs = {r.run_id: r for r in exp.runs()}
    assert {r.status for r in runs.values()} == {RunStatus.FINISHED}
    want = expected(exp)
    clone_name = runs[clone].name

    metrics, tags, params, status = read_mlflow(client, "tracked")
    assert_same(metrics, want)  # float64 in MLflow: bit for bit
    assert set(status.values()) == {"FINISHED"}
    for record in runs.values():
        assert params[record.name] == {
            k: v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)
            for k, v in record.params.items()
        }
        assert tags[record.name]["rf_notebook.status"] == "finished"
        assert tags[record.name]["rf_notebook.trainer_type"] == "SFT"
        assert tags[record.name]["rf_notebook.experiment"] == "tracked"
    assert tags[clone_name]["rf_notebook.cloned_from"] == "1"
    assert tags[clone_name]["rf_notebook.warm_started_from"] == "1"
    assert (
        tags[clone_name]["mlflow.parentRunId"]
        == client.search_runs(
            [client.get_experiment_by_name("tracked").experiment_id], "tags.`rf_notebook.run_id` = '1'"
        )[0].info.run_id
    )
    assert "rf_notebook.cloned_from" not in tags[runs[1].name]

    tb_metrics, tb_tags = read_tensorboard(exp.path / "tensorboard")
    folder = {f"{r.run_id:03d} {r.name}".replace(">", "_"): r.name for r in runs.values()}
    assert_same({folder[k]: v for k, v in tb_metrics.items()}, want, rel=1e-6)  # TensorBoard keeps float32
    assert {folder[k]: v["rf_notebook.status"] for k, v in tb_tags.items()} == {
        r.name: "finished" for r in runs.values()
    }

    tr_metrics, tr_config = read_trackio("tracked-a", exp)
    assert_same(tr_metrics, want)
    for record in runs.values():
        assert tr_config[record.name]["rf_notebook.status"] == "finished"
        assert tr_config[record.name]["training_args.learning_rate"] == record.params["training_args.learning_rate"]
    assert tr_config[clone_name]["rf_notebook.warm_started_from"] == "1"
    exp.end()


def test_a_restart_continues_the_same_tracker_runs_and_export_replays_history(data, tmp_path):
    trackers = ["mlflow", "tensorboard", Trackio("tracked-b")]
    exp = Experiment("restarted", experiments_dir=tmp_path, trackers=trackers)
    exp.run_fit(group(max_steps=24), demo_model_fn, *data, num_chunks=3, seed=1, display=False)
    wait_for(lambda: exp.store.run(2).chunks_done >= 1)
    exp.end(wait=False)  # as a kernel restart leaves it: runs unfinished
    assert exp.store.run(1).status is RunStatus.STOPPED
    stopped = read_mlflow(mlflow_client(exp), "restarted")
    assert set(stopped[3].values()) == {"KILLED"}
    assert {t["rf_notebook.status"] for t in stopped[1].values()} == {"stopped"}

    again = Experiment("restarted", experiments_dir=tmp_path, trackers=trackers)
    again.run_fit(group(max_steps=24), demo_model_fn, *data, num_chunks=3, seed=1, display=False, resume=True)
    assert again.wait(timeout=300)
    want = expected(again)
    assert [s for s, _ in want["r=2"]["loss"]] == list(range(1, 25))
    metrics, tags, _, status = read_mlflow(mlflow_client(again), "restarted")
    assert_same(metrics, want)  # one MLflow run per run, every step once
    assert set(status.values()) == {"FINISHED"}
    tb_metrics, _ = read_tensorboard(again.path / "tensorboard")
    assert_same({k.split(" ", 1)[1]: v for k, v in tb_metrics.items()}, want, rel=1e-6)
    assert_same(read_trackio("tracked-b", again)[0], want)
    again.end()

    # Afterwards, into a tracker that never saw it; twice: the second export finds the runs and adds nothing.
    uri = f"sqlite:///{tmp_path / 'exported.db'}"
    for _ in range(2):
        again.export_tracking("mlflow", uri=uri)
        from mlflow.tracking import MlflowClient

        assert_same(read_mlflow(MlflowClient(uri), "restarted")[0], want)
    again.export_tracking("tensorboard", uri=tmp_path / "tb-export")  # a folder of one's own: a subfolder each
    tb_metrics, _ = read_tensorboard(tmp_path / "tb-export" / "restarted")
    assert_same({k.split(" ", 1)[1]: v for k, v in tb_metrics.items()}, want, rel=1e-6)


class Flaky(Sink):
    """An in-memory tracker (a whole sink in a dozen lines) that fails its first `failures` calls to log."""

    kind = "flaky"

    def __init__(self, failures: int | None):
        self.failures, self.calls = failures, 0
        self.points: dict[str, dict[str, list]] = {}
        self.tags: dict[str, dict] = {}

    def open(self, experiment, experiment_dir):
        pass

    def start_run(self, run):
        self.points.setdefault(run.name, {})
        self.tags[run.name] = dict(run.tags)
        return {}

    def log(self, run, points):
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise OSError(28, "No space left on device")
        for p in points:
            self.points[run.name].setdefault(p.name, []).append((p.step, p.value))

    def set_tags(self, run, tags):
        self.tags[run.name] = dict(tags)


def test_a_failing_tracker_is_reported_once_and_training_and_the_others_go_on(data, tmp_path, caplog):
    broken, flaky = Flaky(failures=None), Flaky(failures=2)
    broken.kind = "broken"
    exp = Experiment("failing", experiments_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="rf_notebook"):
        exp.run_fit(
            group(), demo_model_fn, *data, num_chunks=2, seed=0, display=False, trackers=[broken, flaky, "mlflow"]
        )
        wait_for(lambda: any("broken" in n for n in exp.store.notices()))
        notice = next(n for n in exp.store.notices() if "broken" in n)
        assert "broken tracking failed (training goes on; retrying): OSError" in notice and "No space left" in notice
        from rf_notebook._feed import Feed

        assert Feed(exp.store, "failing").snapshot()["header"]["notices"] == exp.store.notices()
        assert exp.wait(timeout=300)  # the broken tracker does not hold the experiment up
    assert {r.status for r in exp.runs()} == {RunStatus.FINISHED}
    wait_for(lambda: set(exp.tracking_errors()) == {"broken"}, timeout=120)  # the flaky one recovered...
    assert exp.store.notices() == [notice]  # ...and its notice is gone
    assert exp.flush_tracking() is False  # the broken one still fails
    warnings = [r for r in caplog.records if "tracking failed" in r.getMessage()]
    assert len(warnings) == 2  # once per failing tracker, however many times it was retried
    exp.end()  # a last pass for each tracker
    assert exp.store.notices() == []  # nothing retries any more
    want = expected(exp)
    assert {name: {k: sorted(v) for k, v in s.items()} for name, s in flaky.points.items()} == want
    assert_same(read_mlflow(mlflow_client(exp), "failing")[0], want)
    assert {t["rf_notebook.status"] for t in flaky.tags.values()} == {"finished"}


@pytest.mark.parametrize(
    "trackers, message",
    [
        ("wandb", "unknown tracker 'wandb'; expected one of 'mlflow', 'tensorboard', 'trackio'"),
        ([42], "42 is neither a tracker name"),
        ({"mlflow": True}, "expected a list of tracker names"),
        (["mlflow", "mlflow"], "is listed twice"),
    ],
)
def test_bad_trackers_are_refused_before_anything_trains(trackers, message, data, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Experiment("bad", experiments_dir=tmp_path, trackers=trackers)
    exp = Experiment("bad", experiments_dir=tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        exp.run_fit(group(), demo_model_fn, *data, num_chunks=2, display=False, trackers=trackers)
    assert exp.runs() == []


def test_sink_options_are_checked():
    with pytest.raises(ValueError, match=r"MLflow\(tracking_uri=3\): expected a URI string"):
        MLflow(tracking_uri=3)
    with pytest.raises(ValueError, match=r"TensorBoard\(log_dir=1\.5\)"):
        TensorBoard(log_dir=1.5)
    with pytest.raises(ValueError, match=r"Trackio\(project=''\)"):
        Trackio(project="")


def test_names_mlflow_would_refuse_are_made_valid_not_dropped():
    from rf_notebook.tracking._mlflow import key

    assert key("rewards/chosen") == "rewards/chosen" and key("eval_loss") == "eval_loss"
    assert key("acc@1 (%)") == "acc_1 ___" and len(key("x" * 300)) == 250
    assert key("/a//b/") == "a/b" and key("../x") == "_/x" and key("") == "_"
    assert MLflow().metric_key("acc@1") == "acc_1"


def test_a_failed_mlflow_start_is_retried_into_the_same_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from rf_notebook.tracking import TrackedRun
    from rf_notebook.tracking._mlflow import MLflowImpl

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    impl = MLflowImpl(uri, "retry")
    run = TrackedRun("uid-1", 1, "r=2", "retry", {"a": 1, "a@": 2}, {"rf_notebook.status": "running"})
    log_batch = impl.client.log_batch

    def fail_once(*args, **kwargs):
        impl.client.log_batch = log_batch
        raise ConnectionError("server went away")

    impl.client.log_batch = fail_once  # the params batch fails right after the run was created
    with pytest.raises(ConnectionError):
        impl.start_run(run)
    assert impl.start_run(run) == {}
    again = MLflowImpl(uri, "retry")  # and a later session finds it too
    assert again.start_run(run) == {}
    (found,) = MlflowClient(uri).search_runs([impl.experiment_id])
    assert found.data.params == {"a": "1", "a_": "2"} and found.data.tags["rf_notebook.status"] == "running"


def test_sigkill_then_resume_leaves_each_tracker_with_every_point_once(tmp_path):
    """Killed mid-step twice (the trackers a second behind the store, the store ahead of the last checkpoint), then
    resumed: the same tracker runs end with every point of the finished experiment, once."""
    from test_durability import child

    trackers = ["--trackers", "mlflow,tensorboard,trackio"]
    for mode, point in [("start", "step:20"), ("resume", "step:9"), ("resume", None)]:
        proc = child(tmp_path, mode, point, extra=trackers)
        assert proc.returncode == (0 if point is None else -9), proc.stderr[-3000:]
    exp = Experiment("crash", experiments_dir=tmp_path)
    assert {r.status for r in exp.runs()} == {RunStatus.FINISHED}
    want = expected(exp)
    assert_same(read_mlflow(mlflow_client(exp), "crash")[0], want)
    tb_metrics, _ = read_tensorboard(exp.path / "tensorboard")
    assert_same({k.split(" ", 1)[1]: v for k, v in tb_metrics.items()}, want, rel=1e-6)
    assert_same(read_trackio("crash", exp)[0], want)
    exp.store.close()


def test_a_policys_decision_is_in_the_tags_of_the_run_it_stopped(data, tmp_path):
    from rf_notebook.policies import SuccessiveHalving

    sink = Flaky(failures=0)  # an in-memory tracker
    exp = Experiment("policy", experiments_dir=tmp_path)
    exp.run_fit(
        group(),
        demo_model_fn,
        *data,
        num_chunks=2,
        seed=0,
        display=False,
        policy=SuccessiveHalving(eta=2),
        trackers=[sink],
    )
    assert exp.wait(timeout=300)
    exp.end()
    stopped = [r for r in exp.runs() if r.status is RunStatus.STOPPED]
    assert len(stopped) == 1
    (op,) = [op for op in exp.store.ic_log() if op.origin == "policy"]
    tags = sink.tags[stopped[0].name]
    assert tags["rf_notebook.status"] == "stopped"
    assert tags["rf_notebook.policy"] == f"stop at step {op.step}: {op.reason}"
    (kept,) = [r for r in exp.runs() if r.run_id != stopped[0].run_id]
    assert "rf_notebook.policy" not in sink.tags[kept.name]


class Costly(Flaky):
    """A tracker whose every `log` burns `cpu_s` seconds of its thread's CPU time."""

    kind = "costly"

    def __init__(self, cpu_s: float):
        super().__init__(failures=0)
        self.cpu_s = cpu_s

    def log(self, run, points):
        until = time.thread_time() + self.cpu_s
        while time.thread_time() < until:
            pass
        super().log(run, points)


def test_a_costly_tracker_is_throttled_to_its_cpu_share_but_not_for_news_about_runs(tmp_path):
    from rf_notebook.store import RunRecord, Store
    from rf_notebook.tracking import Tracking
    from rf_notebook.tracking._worker import DUTY

    store = Store()
    store.add_run(RunRecord(1, "only", "SFT", {}, status=RunStatus.TRAINING, rows_per_step=8.0))
    tracking = Tracking(store, "throttled", tmp_path, [Flaky(failures=0), Costly(cpu_s=0.02)], interval=0.05)
    cheap, costly = (w.sink for w in tracking.workers)  # each tracking works on its own copies
    tracking.start()
    step = 0

    def train(seconds, status=None):  # a value every 10 ms: something new at every pass
        nonlocal step
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            step += 1
            store.log_metrics(1, step, 0, {"loss": 1.0 / step})
            if status is not None:  # queued and training alternate at every chunk: not news for a tracker
                store.update_run(1, status=status if step % 2 else RunStatus.TRAINING)
            time.sleep(0.01)

    train(1.0)
    # The cheap tracker passes every 50 ms; a pass of the costly one costs >= 20 ms of CPU, so it waits >= 20 ms / DUTY
    # (4 s) after it: at most two passes with values in the first seconds, chunk switches or not.
    assert 0.02 / DUTY >= 4.0
    train(1.5, status=RunStatus.QUEUED)
    assert cheap.calls >= 10
    assert costly.calls <= 2, costly.calls
    assert tracking.busy()["costly"] < 0.1
    store.update_run(1, status=RunStatus.STOPPED)  # news: the throttle does not hold it back
    wait_for(lambda: costly.tags["only"]["rf_notebook.status"] == "stopped", timeout=1.0)
    store.update_run(1, status=RunStatus.TRAINING)
    train(0.2)
    started = time.monotonic()
    assert tracking.flush(timeout=30)  # nor does it hold back a flush
    assert time.monotonic() - started < 2.0
    tracking.close()
    for sink in (cheap, costly):
        assert [s for s, _ in sink.points["only"]["loss"]] == list(range(1, step + 1))
