"""Tiny real checkpoints for tests, notebooks and demos: a character tokenizer with Gemma 4's
special-token ids, and a small random Gemma 4 saved by transformers in HF format.

`write_char_tokenizer` needs only the `tokenizers` library. `write_tiny_checkpoint` needs torch and
transformers (the `[test]` extra); they are imported only when it is called.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import BPE

from ..chat import THINK, THOUGHT_END, THOUGHT_START

# Gemma 4's special ids (docs/architecture.md §4) that a tiny vocabulary keeps at the same numbers.
SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 50: "<|tool_response>",
            105: "<|turn>", 106: "<turn|>"}


# Gemma 4's thinking-mode tokens, for tokenizers that need them (`write_char_tokenizer(..., extra=THINKING)`).
THINKING = {98: THINK, 100: THOUGHT_START, 101: THOUGHT_END}


def write_char_tokenizer(path: str, vocab_size: int = 256, extra: dict[int, str] | None = None) -> None:
    """A character-level `tokenizer.json`: specials (SPECIALS, plus `extra`) at Gemma's ids, printable ASCII and
    newline elsewhere."""

    specials = {**SPECIALS, **(extra or {})}
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab, free = dict((v, k) for k, v in specials.items()), [i for i in range(vocab_size) if i not in specials]
    if len(free) < len(chars):
        raise ValueError(f"vocab_size {vocab_size} is too small for a character tokenizer")
    for ch, i in zip(chars, free, strict=False):
        vocab[ch] = i
    for i in free[len(chars):]:
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": False, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                   "padding_side": "left"}, f, indent=1)


def tiny_text_config(**overrides):
    """A small E2B-like transformers config: PLE, KV sharing, double-wide MLP, 4:1 pattern."""
    from transformers import Gemma4TextConfig

    kw = dict(vocab_size=256, hidden_size=64, num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=1,
              head_dim=32, global_head_dim=64, intermediate_size=96, hidden_size_per_layer_input=16,
              vocab_size_per_layer_input=256, num_kv_shared_layers=4, use_double_wide_mlp=True, sliding_window=8,
              layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(10)],
              final_logit_softcapping=30.0, max_position_embeddings=512, initializer_range=0.05,
              pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106])
    kw.update(overrides)
    return Gemma4TextConfig(**kw)


def perturb_scales(model, seed: int):
    """Set every norm weight, `layer_scalar` and router scale of a transformers Gemma 4 to U(0.75, 1.25),
    so that no feature that multiplies by them can hide behind their 1.0 init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "layernorm.weight", "_1.weight", "_2.weight", "layer_scalar",
                              "router.scale", "per_expert_scale")):
                t.copy_(0.75 + 0.5 * torch.rand(t.shape, generator=g))
    return model


def write_tiny_checkpoint(path: str, seed: int = 0, **overrides) -> str:
    """Save a small random Gemma4ForCausalLM (norms and scalars perturbed from 1.0) with a tokenizer."""
    import torch
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    model = perturb_scales(Gemma4ForCausalLM(tiny_text_config(**overrides)).eval(), seed + 1)
    model.save_pretrained(path)
    write_char_tokenizer(path, model.config.vocab_size)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0}, f, indent=1)
    return path
