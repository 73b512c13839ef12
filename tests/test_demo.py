"""The embedded demo: shipped files, tokenizer properties, the task and its metric."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from transformers.trainer_utils import EvalPrediction

from rf_notebook.demo import MODEL_DIR, arithmetic_dataset, demo_model_fn, exact_match_metrics
from rf_notebook.demo._data import arithmetic_pairs


def test_import_rf_notebook_is_light():
    code = "import sys, rf_notebook; rf_notebook.__all__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_model_is_small_and_llama_style():
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert size < 5 * 1024 * 1024
    model, tokenizer = demo_model_fn(None)
    params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= params <= 500_000
    assert model.config.model_type == "llama"


def test_tokenizer_splits_digits_and_has_a_prefix_consistent_chat_template():
    _, tokenizer = demo_model_fn(None)
    digits = tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([d]) for d in digits] == list("12345")
    prompt = [{"role": "user", "content": "23+58"}]
    full = prompt + [{"role": "assistant", "content": "81"}]
    p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    f = tokenizer.apply_chat_template(full, tokenize=True, return_dict=False)
    assert f[: len(p)] == p
    assert tokenizer.decode(f) == "<|im_start|>user\n23+58<|im_end|>\n<|im_start|>assistant\n81<|im_end|>\n"


def test_train_and_eval_pairs_are_disjoint_and_the_data_set_is_conversational():
    assert not set(arithmetic_pairs("train")) & set(arithmetic_pairs("eval"))
    train = arithmetic_dataset("train")
    assert len(train) == 1024 and train.column_names == ["prompt", "completion"]
    a, b = map(int, train[0]["prompt"][0]["content"].split("+"))
    assert train[0]["completion"][0]["content"] == str(a + b)


def test_exact_match_needs_every_completion_token_right():
    labels = np.array([[-100, 5, 6, 7], [-100, -100, 5, 6]])
    right = np.array([[5, 6, 7, 0], [0, 5, 6, 0]])  # position t predicts token t + 1
    assert exact_match_metrics(EvalPrediction(predictions=right, label_ids=labels)) == {
        "exact_match": 1.0,
        "token_accuracy": 1.0,
    }
    wrong = right.copy()
    wrong[0, 1] = 9
    assert exact_match_metrics(EvalPrediction(predictions=wrong, label_ids=labels)) == {
        "exact_match": 0.5,
        "token_accuracy": 0.8,
    }
    logits = np.eye(10)[right]  # logits are reduced by argmax
    assert exact_match_metrics(EvalPrediction(predictions=logits, label_ids=labels))["exact_match"] == 1.0


def test_teacher_forced_exact_match_equals_greedy_decoding(tmp_path):
    """The one-forward-pass metric and slow greedy generation agree on the base model."""
    from trl import SFTConfig, SFTTrainer

    from rf_notebook.demo import greedy_exact_match

    evl = arithmetic_dataset("eval", n=48)
    model, tokenizer = demo_model_fn(None)
    greedy = greedy_exact_match(model, tokenizer, evl)
    args = SFTConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, per_device_eval_batch_size=16
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=evl,
        eval_dataset=evl,
        processing_class=tokenizer,
        compute_metrics=exact_match_metrics,
    )
    assert trainer.evaluate()["eval_exact_match"] == greedy
