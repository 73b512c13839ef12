"""Rebuild the embedded demo model: `python -m rf_notebook.demo._build [--steps N] [--out DIR]`.

This script is how the files in `rf_notebook/demo/tiny-arith/` were made; the package ships those files and
never runs this at import or training time. It

1. trains a byte-level BPE tokenizer (every digit its own token, ChatML-style special tokens and a
   prefix-consistent chat template) on a synthetic arithmetic corpus, offline;
2. pretrains a tiny Llama-style causal LM (~220k parameters) from scratch on that corpus: plain-text
   addition and subtraction ("23+58=81") and chat-formatted *subtraction* only;
3. saves model (safetensors) and tokenizer with `save_pretrained`.

The SFT demo then asks for *addition in chat form*, which the base model has never seen, so LoRA
fine-tuning has something real and quick to learn: it must route the chat prompt to a skill the base has.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path

from rf_notebook.demo._data import arithmetic_pairs

logger = logging.getLogger(__name__)

OUT_DIR = Path(__file__).with_name("tiny-arith")
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chat(question: str, answer: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def corpus(n: int, seed: int, chat_add_share: float = 0.0) -> list[str]:
    """Pretraining documents; eval pairs never appear. Chat-formatted addition is `chat_add_share` of them."""
    rng = random.Random(seed)
    train_pairs = arithmetic_pairs("train")
    docs = []
    for _ in range(n):
        a, b = rng.choice(train_pairs)
        kind = rng.random()
        if kind < chat_add_share:
            docs.append(_chat(f"{a}+{b}", str(a + b)))
        elif kind < 0.4:
            docs.append(f"{a}+{b}={a + b}\n")
        elif kind < 0.7:
            hi, lo = max(a, b), min(a, b)
            docs.append(f"{hi}-{lo}={hi - lo}\n")
        else:
            hi, lo = max(a, b), min(a, b)
            docs.append(_chat(f"{hi}-{lo}", str(hi - lo)))
    return docs


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts + ["user", "assistant"] * 50, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=64,
    )


def build_model(vocab_size: int, pad_token_id: int, eos_token_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, docs: list[str], steps: int, batch_size: int, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    pad = tokenizer.pad_token_id
    model.train()
    start = time.time()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = rng.sample(encoded, batch_size)
        width = max(map(len, batch))
        ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
        labels = ids.masked_fill(ids == pad, -100)
        loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info("step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--chat-add-share", type=float, default=0.02)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    docs = corpus(60_000, seed=args.seed, chat_add_share=args.chat_add_share)
    tokenizer = build_tokenizer(docs)
    torch.manual_seed(args.seed)
    model = build_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    logger.info("parameters: %d, vocab: %d", sum(p.numel() for p in model.parameters()), len(tokenizer))
    pretrain(model, tokenizer, docs, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    logger.info("saved to %s", args.out)


if __name__ == "__main__":
    main()
