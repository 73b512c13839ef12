"""A run's files, checkpoints and base are its own: runs told to share a folder do not share one, a checkpoint's
cleanup removes nothing but that run's older checkpoints, and a run with another tokenizer gets its own base. On the
demo model, a few seconds each."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rf_notebook import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_notebook.demo import DEMO_MODEL, arithmetic_dataset, demo_model_fn
from rf_notebook.store import RunStatus

TRAIN = arithmetic_dataset("train", n=32)


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_runs_told_to_share_a_folder_keep_their_own_checkpoints_and_exports(tmp_path):
    shared = tmp_path / "shared"
    # The constructor refuses output_dir; replace() (as grid expansion builds each run) does not check: the run's
    # arguments are where the experiment's own folder must win.
    args = RFSFTConfig(learning_rate=List([3e-3, 1e-3]), per_device_train_batch_size=8, max_steps=4)
    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=args.replace(output_dir=str(shared)),
        ),
        trainer_type="SFT",
    )
    exp = Experiment("own", experiments_dir=tmp_path / "experiments")
    exp.run_fit(group, demo_model_fn, TRAIN, num_chunks=2, seed=0, display=False)
    assert exp.wait(timeout=300)
    assert [r.status for r in exp.runs()] == [RunStatus.FINISHED, RunStatus.FINISHED]
    live = {run_id: adapter(exp.export(run_id, tmp_path / f"live-{run_id}")) for run_id in (1, 2)}
    with pytest.raises(ValueError, match=r"override 'output_dir' is '/elsewhere', but the experiment owns each run"):
        exp.clone_modify(1, {"output_dir": "/elsewhere"})
    assert exp.ic_log().outcome.tolist() == ["refused"]
    exp.end(wait=False)

    assert any(not torch.equal(live[1][k], live[2][k]) for k in live[1])  # two different adapters
    for run_id in (1, 2):  # after end(): each run's own last checkpoint, the adapter it ended with
        saved = adapter(exp.export(run_id, tmp_path / f"saved-{run_id}"))
        assert saved.keys() == live[run_id].keys()
        for key, value in live[run_id].items():
            torch.testing.assert_close(saved[key], value, atol=0, rtol=0, msg=f"run {run_id}: {key}")
    assert not shared.exists()  # nothing written outside the experiment's folder
    for run_id in (1, 2):
        folder = exp.path / "runs" / str(run_id)
        assert exp.runs()[run_id - 1].config["training_args"]["output_dir"] == str(folder)
        assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-4"]


def test_a_checkpoint_removes_only_the_runs_own_older_checkpoints(tmp_path, monkeypatch):
    from rf_notebook.engine.torch_backend import TorchBackend

    folder = tmp_path / "checkpoints"
    kept = ["other-run", "step-final", "12", "notes.tmp-step-3"]
    for name in ["step-1", ".tmp-step-2", *kept]:
        (folder / name).mkdir(parents=True)
    backend = TorchBackend(demo_model_fn, TRAIN, None, num_chunks=2)
    backend._snapshot = lambda slot: None  # no trainer needed
    monkeypatch.setattr("rf_notebook.engine.checkpoints.encode", lambda snapshot: snapshot)
    monkeypatch.setattr(
        "rf_notebook.engine.checkpoints.write_snapshot",
        lambda snapshot, path: (path / "trainer_state.json").write_text("{}"),
    )
    slot = SimpleNamespace(run_id=1, step=3, trainer=SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path))))
    assert backend.checkpoint(slot) == folder / "step-3"
    backend.flush()
    assert sorted(p.name for p in folder.iterdir()) == sorted(["step-3", *kept])


def test_runs_with_another_tokenizer_get_their_own_base(tmp_path):
    loaded = []

    def model_fn(model_config):
        loaded.append(model_config["tokenizer_kwargs"])
        model, tokenizer = demo_model_fn(model_config)
        tokenizer.padding_side = model_config["tokenizer_kwargs"]["padding_side"]
        return model, tokenizer

    group = RFGridSearch(
        RFModelConfig(
            DEMO_MODEL,
            peft_config=RFLoraConfig(r=4, target_modules="all-linear"),
            training_args=RFSFTConfig(learning_rate=List([3e-3, 1e-3]), per_device_train_batch_size=8, max_steps=2),
            tokenizer_kwargs=List([{"padding_side": "left"}, {"padding_side": "right"}]),
        ),
        trainer_type="SFT",
    )
    exp = Experiment("tokenizers", experiments_dir=tmp_path)
    exp.run_fit(group, model_fn, TRAIN, num_chunks=1, seed=0, display=False)
    assert exp.wait(timeout=300)
    exp.end(wait=False)
    assert [r.status for r in exp.runs()] == [RunStatus.FINISHED] * 4
    # one base per distinct (model, tokenizer): each pair loaded once, with its own tokenizer kwargs
    assert sorted(k["padding_side"] for k in loaded) == ["left", "right"]
