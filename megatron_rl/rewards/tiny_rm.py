"""The CPU demo's learned reward model (recipe ``tiny_moe_rm``), made offline in about a minute:

    python -m megatron_rl.rewards.tiny_rm runs/tiny_rm

A tiny Qwen3 ``ForSequenceClassification`` (random init, 2 layers, hidden 64) with a word
tokenizer and chat template of its own (ids and specials differ from the policy's ``word``
tokenizer, so scoring re-tokenises from text), regressed onto a property of the response: the
mean of its digit words over 9 (``digit_score``; 0 without digits). It sees synthetic prompts and
random responses, so it prefers large digits whatever the prompt, and a policy trained against it
learns to answer with nines. A stand-in for a real preference model, small enough for CI.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import List, Tuple

from megatron_rl.data.synthetic import make_rows, WORDS

RM_SPECIALS = ["<pad>", "<|end|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}")


def digit_score(response: str) -> float:
    """The property the tiny reward model learns: the mean digit of ``response``'s digit words
    over 9 (0 when it has none)."""
    digits = [int(w) for w in response.split() if w.isdigit() and len(w) == 1]
    return sum(digits) / (9.0 * len(digits)) if digits else 0.0


def rm_tokenizer():
    """The tiny reward model's ``PreTrainedTokenizerFast``: the policy's words in reverse order
    after specials of its own, split on whitespace, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(RM_SPECIALS + list(reversed(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>",
                                  unk_token="<unk>")
    out.chat_template = CHAT_TEMPLATE
    return out


def _examples(n: int, seed: int) -> List[Tuple[str, str]]:
    """``(prompt, response)`` pairs: synthetic prompts, random responses of digits (and now and
    then a non-digit word)."""
    rng = random.Random(seed)
    prompts = [r["prompt"] for r in make_rows("copy", 256, min_len=2, max_len=3, seed=seed)]
    words = [w for w in WORDS if not w.isdigit()]
    out = []
    for _ in range(n):
        resp = [str(rng.randrange(10)) if rng.random() < 0.9 else rng.choice(words)
                for _ in range(rng.randint(1, 5))]
        out.append((rng.choice(prompts), " ".join(resp)))
    return out


def train_tiny_rm(out: str, steps: int = 400, seed: int = 0, batch: int = 64) -> float:
    """Train the demo's reward model and save it (weights, config, tokenizer) at ``out``;
    returns the held-out mean absolute error of its scores against ``digit_score``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from megatron_rl.model.tiny import tiny_hf_config

    tok = rm_tokenizer()
    cfg = tiny_hf_config("qwen3", vocab_size=32, architectures=["Qwen3ForSequenceClassification"],
                         num_labels=1, pad_token_id=tok.pad_token_id)
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    config = AutoConfig.for_model("qwen3", **kwargs)
    config.architectures = cfg["architectures"]
    with torch.random.fork_rng():   # a run that makes it keeps its own random stream
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def encode(pairs):
        """Padded ids (right; the score reads the last non-pad token) and targets."""
        from megatron_rl.rewards.learned import conversation

        ids = [tok.apply_chat_template(conversation(p, r), tokenize=True)["input_ids"] for p, r in pairs]
        width = max(len(x) for x in ids)
        x = torch.full((len(ids), width), tok.pad_token_id)
        for i, row in enumerate(ids):
            x[i, :len(row)] = torch.tensor(row)
        return x, torch.tensor([digit_score(r) for _, r in pairs])

    data, held = _examples(steps * batch, seed), encode(_examples(512, seed + 1))
    model.train()
    for s in range(steps):
        x, y = encode(data[s * batch:(s + 1) * batch])
        loss = torch.nn.functional.mse_loss(model(input_ids=x).logits.squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        err = float((model(input_ids=held[0]).logits.squeeze(-1) - held[1]).abs().mean())
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return err


def main(argv=None) -> int:
    """``python -m megatron_rl.rewards.tiny_rm OUT``: make the demo's reward model."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the directory to write (config.json, safetensors, tokenizer)")
    ap.add_argument("--steps", type=int, default=400, help="training steps (batch 64)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    err = train_tiny_rm(a.out, a.steps, a.seed)
    print(f"tiny reward model written to {a.out}: held-out mean |score - digit_score| = {err:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
