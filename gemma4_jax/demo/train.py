"""Training the embedded demo model: its config, its tokenizer, data batches and the optax loop.

Owns the demo's Gemma 4 config (every text feature at toy size: sliding and full layers with
different head dims, per-layer embeddings, KV sharing with double-wide MLPs on the shared layers,
k_eq_v with fewer KV heads on full layers), a byte-level BPE tokenizer trained with `tokenizers`
on the synthetic problems (digits split one per token; Gemma 4's special tokens at their ids),
chat-formatted batches with the loss on the model turn only (a `TrainConfig.instruction_prob` share of
user turns ends with `gsm8k.INSTRUCTION`, the others are the bare question), and a jitted AdamW step
over the NNX model's split parameters. `train` is deterministic given its seed.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from ..config import FULL, SLIDING, Gemma4Config
from ..evals.gsm8k import extract_answer, user_text
from ..model.text import Gemma4Text
from ..testing.tiny import SPECIALS
from . import arith

TURN_END_ID = 106

DEMO_HF_CONFIG: dict = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 6,
    "layer_types": [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "global_head_dim": 64,  # full layers: wider heads, ...
    "num_global_key_value_heads": 1,  # ... fewer KV heads, and values = keys (k_eq_v)
    "attention_k_eq_v": True,
    "sliding_window": 64,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": 512,
    "num_kv_shared_layers": 2,  # layers 4 (sliding) and 5 (full) reuse layers 3 and 2's K/V
    "use_double_wide_mlp": True,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_parameters": {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults: about 15 minutes on two CPU cores."""

    seed: int = 0
    steps: int = 1200
    batch_size: int = 32
    seq_len: int = 120  # chat-formatted problems are 70-115 tokens
    peak_lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    vocab_size: int = 512
    tokenizer_corpus: int = 20_000  # problems the BPE merges are learnt from
    held_out: int = 500
    data_offset: int = 0  # selects another training stream (a second stage started from a checkpoint)
    instruction_prob: float = 1.0  # share of prompts with the instruction sentence; the rest are bare questions
    log_every: int = 50


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with Gemma 4's special tokens at their ids.

    Digits are split one per token: the model then adds and multiplies digit by digit instead of
    memorising a token for every number. Merges are learnt without the specials, whose ids are then
    carved out of the id space (`tiny.SPECIALS`: <pad> 0, <eos> 1, <bos> 2, <|turn> 105, <turn|> 106 …).
    """

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    n_plain = vocab_size - len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=n_plain, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)

    data = json.loads(tok.to_str())
    learnt = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])  # in the trainer's order
    free = [i for i in range(vocab_size) if i not in SPECIALS]
    vocab = {t: free[k] for k, (t, _) in enumerate(learnt)}
    for k in range(len(learnt), len(free)):  # a short corpus may learn fewer merges
        vocab[f"<unused{free[k]}>"] = free[k]
    vocab.update({s: i for i, s in SPECIALS.items()})  # added tokens keep their ids only if the vocab has them
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for i, s in sorted(SPECIALS.items())
    ]
    tok = Tokenizer.from_str(json.dumps(data))
    for i, s in SPECIALS.items():
        if tok.token_to_id(s) != i or tok.encode(s).ids != [i]:
            raise AssertionError(f"special token {s} did not keep id {i}")
    return tok


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)


def write_tokenizer_files(tok, out_dir: str) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja (the Gemma 4 turn format)."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                   "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "padding_side": "left", "model_max_length": DEMO_HF_CONFIG["max_position_embeddings"]},
                  f, indent=1)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# Data


def prompt_text(question: str, instruction: bool = True) -> str:
    """The user turn: the question and the instruction (`gsm8k.user_text`), or the bare question."""
    return user_text(question) if instruction else question.strip()


def encode_example(tokenizer, problem: dict, instruction: bool = True) -> tuple[list[int], int]:
    """Chat-formatted ids (prompt, worked answer, `<turn|>`) and the prompt's length.

    The prompt is encoded exactly as at inference (`encode_chat`), the answer separately, so that
    training sees the same token boundary the generator continues from. Without `instruction` the
    user turn is the bare question.
    """
    prompt = tokenizer.encode_chat(prompt_text(problem["question"], instruction))
    answer = tokenizer.encode(problem["answer"], add_bos=False)
    return prompt + answer + [TURN_END_ID], len(prompt)


def make_batch(tokenizer, problems: list[dict], seq_len: int,
               instruction: list[bool] | None = None) -> dict[str, np.ndarray]:
    """inputs/targets [B, seq_len] (right-padded with 0) and weights: 1 on answer targets only.

    `instruction[r]` False: row r's user turn is the bare question (default: every row has the instruction).
    """
    b = len(problems)
    instruction = [True] * b if instruction is None else list(instruction)
    if len(instruction) != b:
        raise ValueError(f"{len(instruction)} instruction flags for {b} problems")
    inputs, targets = np.zeros((b, seq_len), np.int32), np.zeros((b, seq_len), np.int32)
    weights = np.zeros((b, seq_len), np.float32)
    for r, p in enumerate(problems):
        ids, n_prompt = encode_example(tokenizer, p, instruction[r])
        if len(ids) > seq_len + 1:
            raise ValueError(f"an example of {len(ids)} tokens exceeds seq_len {seq_len}")
        n = len(ids) - 1
        inputs[r, :n], targets[r, :n] = ids[:-1], ids[1:]
        weights[r, n_prompt - 1:n] = 1.0  # targets from the first answer token through <turn|>
    return {"inputs": inputs, "targets": targets, "weights": weights}


# ---------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    warmup = min(tc.warmup, tc.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.peak_lr, warmup, tc.steps, tc.peak_lr * 0.05)
    # No weight decay on vectors (norms, scalars): decaying them towards 0 only fights the 1.0 init.
    mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay, mask=mask))


def loss_fn(graphdef, params, batch):
    """Mean cross-entropy over the weighted (answer) tokens."""
    logits = nnx.merge(graphdef, params)(batch["inputs"])  # [B,T,V] float32
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(graphdef, optimizer, params, opt_state, batch):
    loss, grads = jax.value_and_grad(functools.partial(loss_fn, graphdef))(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def demo_config() -> Gemma4Config:
    return Gemma4Config.from_hf_dict(DEMO_HF_CONFIG, name="gemma4-demo")


def train(tc: TrainConfig, tokenizer, log: Callable[[str], None] = print,
          init: Gemma4Text | None = None) -> tuple[Gemma4Text, list[float]]:
    """Train the demo model (fresh, or continuing from `init`); returns it and the loss of every step.

    The held-out problems (stream `seed + 1`) are excluded from every training stream. Which prompts
    keep the instruction is drawn from its own generator (seed, data_offset), so the problem stream is
    the same whatever `instruction_prob`; at 1.0 (the default) no draw is made and every prompt has it.
    """
    if not 0.0 <= tc.instruction_prob <= 1.0:
        raise ValueError(f"instruction_prob must be in [0, 1], got {tc.instruction_prob}")
    model = init if init is not None else Gemma4Text(demo_config(), jnp.float32, nnx.Rngs(tc.seed))
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(tc)
    opt_state = optimizer.init(params)
    exclude = {p["question"] for p in arith.held_out(tc.seed + 1, tc.held_out)}
    stream = arith.problems(tc.seed + 2 + 1000 * tc.data_offset, exclude)
    coin = np.random.default_rng([tc.seed, tc.data_offset, 4])  # instruction or not, per example
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, tc.steps + 1):
        keep = None if tc.instruction_prob >= 1.0 else (coin.random(tc.batch_size) < tc.instruction_prob).tolist()
        batch = make_batch(tokenizer, [next(stream) for _ in range(tc.batch_size)], tc.seq_len, keep)
        params, opt_state, loss = train_step(graphdef, optimizer, params, opt_state,
                                             {k: jnp.asarray(v) for k, v in batch.items()})
        losses.append(float(loss))
        if step % tc.log_every == 0 or step == 1:
            recent = np.mean(losses[-tc.log_every:])
            log(f"step {step:5d}  loss {recent:.4f}  ({time.perf_counter() - t0:.0f}s)")
    return nnx.merge(graphdef, params), losses


def held_out_accuracy(model, problems: list[dict], batch_size: int = 100, max_new_tokens: int = 64,
                      instruction: bool = True) -> float:
    """Share of problems whose greedy answer (our `generate`) ends in the right `#### <number>`.

    `instruction` False: the prompts are the bare questions.
    """
    correct = 0
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        prompts = [prompt_text(p["question"], instruction) for p in chunk]
        outs = model.generate_text(prompts, max_new_tokens=max_new_tokens)
        correct += sum(extract_answer(o) == str(p["number"]) for o, p in zip(outs, chunk, strict=True))
    return correct / len(problems)
