"""The embedded demo model and the HF exporter, against transformers and the original HF tensors."""

import json
import os
import re

import numpy as np
import pytest
import torch
from hf_fixtures import build_hf_model, rel_err, save_hf

import gemma4_jax
from gemma4_jax.checkpoint.export import export_hf, hf_config_dict, module_params
from gemma4_jax.checkpoint.hf import read_hf_params
from gemma4_jax.checkpoint.safetensors_io import SafetensorsFile
from gemma4_jax.config import FULL, PRESETS, SLIDING, Gemma4Config
from gemma4_jax.demo import arith, demo_path
from gemma4_jax.demo.train import make_batch, prompt_text
from gemma4_jax.evals.gsm8k import extract_answer, user_text
from gemma4_jax.tokenizer import builtin_chat_prompt


@pytest.fixture(scope="module")
def demo():
    return gemma4_jax.load(demo_path(), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def hf_demo():
    from transformers import Gemma4ForCausalLM

    model = Gemma4ForCausalLM.from_pretrained(demo_path(), dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    return model


def test_demo_files_and_features(demo):
    path = demo_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    assert sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) <= 10_000_000
    cfg = demo.config
    sliding = [s for s in cfg.layers if s.attn_type == SLIDING]
    full = [s for s in cfg.layers if s.attn_type == FULL]
    assert sliding and full and sliding[0].head_dim != full[0].head_dim
    assert cfg.ple_dim > 0 and cfg.num_kv_shared_layers > 0
    assert any(not s.owns_kv for s in sliding) and any(not s.owns_kv for s in full)
    assert all(s.k_eq_v for s in full if s.owns_kv) and full[0].num_kv_heads < sliding[0].num_kv_heads
    assert demo.stop_tokens == (1, 106, 50)


def test_demo_tokenizer_keeps_gemma_specials_and_splits_digits(demo):
    tok = demo.tokenizer
    for i, s in {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<|turn>", 106: "<turn|>"}.items():
        assert tok.id_to_token(i) == s
    ids = tok.encode("<|turn>user\nIt costs $1,234.<turn|>", add_bos=False)
    assert ids[0] == 105 and ids[-1] == 106
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == ["1", "2", "3", "4"]
    text = open(os.path.join("/work/shared/data/gsm8k", "test.jsonl")).readline() if os.path.exists(
        "/work/shared/data/gsm8k/test.jsonl") else "Janet’s ducks lay 16 eggs per day — ünïcode ok?"
    assert tok.decode(tok.encode(text, add_bos=False)) == text  # byte-level: any text round-trips


def test_demo_tokenizer_and_template_match_transformers(demo):
    """The shipped template as transformers renders it, and as the built-in Gemma 4 format writes it: a question as a
    string, as README-style text parts, and a conversation with a system turn, parts and an earlier thought; the
    demo is not a thinking model, so thinking mode leaves the prompt as it is (gemma4_jax/demo/__init__.py)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(demo_path())
    question = user_text(arith.held_out(123, 1)[0]["question"])
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": " 2 + 2? "}]
    conversations = [
        [{"role": "user", "content": question}],
        [{"role": "user", "content": [{"type": "text", "text": question}]}],
        [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": parts},
         {"role": "assistant", "content": "<|channel>thought\nadd<channel|> 2 + 2 = 4.\n#### 4"},
         {"role": "user", "content": [{"type": "text", "text": "And 3 + 3?"}]}],
    ]
    for messages in conversations:
        want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert demo.tokenizer.encode_chat(messages) == list(want)
        text = demo.tokenizer.chat_prompt(messages)
        assert text == builtin_chat_prompt(messages) == demo.tokenizer.chat_prompt(messages, enable_thinking=True)
    assert demo.tokenizer.encode_chat(conversations[1]) == demo.tokenizer.encode_chat(question)
    assert "<|turn>user\nWhat is2 + 2?<turn|>\n<|turn>model\n2 + 2 = 4.\n#### 4<turn|>" in text


def test_demo_greedy_equals_transformers(demo, hf_demo):
    """Chat prompts of different lengths in one batch; 40 new tokens each, no early stop."""
    problems = arith.held_out(99, 3)
    prompts = [demo.tokenizer.encode_chat(user_text(p["question"])) for p in problems]
    ours = demo.generate(prompts, max_new_tokens=40, stop_tokens=())
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_demo.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("instruction", [True, False], ids=["instruction", "bare"])
def test_demo_solves_held_out_problems(demo, instruction):
    """The training run's own held-out set (seed + 1): most answers are right, and they end in `#### n`,
    whether the question ends with the instruction sentence or comes bare."""
    with open(os.path.join(demo_path(), "training.json")) as f:
        info = json.load(f)
    problems = arith.held_out(info["train_config"]["seed"] + 1, 40)
    outs = demo.generate_text([prompt_text(p["question"], instruction) for p in problems], max_new_tokens=64)
    assert all("####" in o for o in outs)
    right = sum(extract_answer(o) == str(p["number"]) for o, p in zip(outs, problems, strict=True))
    assert right / len(problems) >= 0.5, right


def test_arith_problems_are_right_and_deterministic():
    """Every step's calculation, recomputed by Python, and the final line; same seed, same problems."""
    problems = arith.held_out(5, 400)
    assert problems == arith.held_out(5, 400) and len({p["question"] for p in problems}) == 400
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for p in problems:
        *steps, last = p["answer"].splitlines()
        assert last == f"#### {p['number']}" and steps
        for line in steps:
            a, op, b, c = re.search(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", line).groups()
            assert ops[op](int(a), int(b)) == int(c), line
            if op == "/":
                assert int(a) % int(b) == 0, line
        assert int(c) == p["number"] >= 0
    stream = arith.problems(5, exclude={p["question"] for p in problems})
    assert not {next(stream)["question"] for _ in range(400)} & {p["question"] for p in problems}


@pytest.mark.parametrize("instruction", [None, [True, False, True]], ids=["default", "mixed"])
def test_training_loss_covers_exactly_the_answer(demo, instruction):
    """The weighted targets of a batch are the model turn (worked answer + <turn|>) and nothing else; a row
    flagged False has the bare question as its user turn."""
    problems = arith.held_out(7, 3)
    batch = make_batch(demo.tokenizer, problems, 128, instruction)
    for row, p in enumerate(problems):
        w = batch["weights"][row] > 0
        assert demo.tokenizer.decode(batch["targets"][row][w].tolist()) == p["answer"] + "<turn|>"
        text = user_text(p["question"]) if instruction is None or instruction[row] else p["question"]
        prompt = demo.tokenizer.encode_chat(text)
        assert batch["inputs"][row][: len(prompt)].tolist() == prompt
        assert not w[: len(prompt) - 1].any()


# ---------------------------------------------------------------------------------------------
# Exporter


# e2b: PLE, KV sharing of both layer types, double-wide MLP; 26b-a4b: MoE, k_eq_v, fewer full-layer KV heads.
@pytest.mark.parametrize("family", ["e2b", "26b-a4b"])
def test_export_reproduces_the_hf_tensors_and_logits(family, tmp_path):
    """transformers checkpoint → our loader → export: every tensor equals transformers' own, the exported
    directory loads back to identical parameters, and transformers' logits on it equal ours."""
    from transformers import Gemma4ForCausalLM

    hf_model = build_hf_model(family, seed=3)
    model = gemma4_jax.load(save_hf(hf_model, str(tmp_path / "src")), dtype="float32", progress=False)
    out = export_hf(str(tmp_path / "export"), model.config, module_params(model.module))

    exported = SafetensorsFile(os.path.join(out, "model.safetensors"))
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert set(exported.keys()) <= set(state)
    for name in exported.keys():
        np.testing.assert_array_equal(exported.get(name), state[name], err_msg=name)
    # Not written: the tied head and K/V weights that shared layers never use.
    skipped = set(state) - set(exported.keys())
    assert all(n == "lm_head.weight" or ".self_attn.k_" in n or ".self_attn.v_" in n for n in skipped), skipped

    again = read_hf_params(out, model.config, np.float32)
    for path, value in module_params(model.module).items():
        np.testing.assert_array_equal(again[path], value, err_msg="/".join(path))

    hf = Gemma4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf.config._attn_implementation = "eager"
    ids = np.random.default_rng(0).integers(3, 256, size=(2, 19))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(model.logits(ids), want) <= 1e-4  # float32 summation-order noise (test_parity.F32_BOUND)


@pytest.mark.parametrize("name", [*PRESETS, "demo"])
def test_config_json_round_trips(name):
    raw = json.load(open(os.path.join(demo_path(), "config.json"))) if name == "demo" else PRESETS[name]
    cfg = Gemma4Config.from_hf_dict(raw, name=name)
    back = Gemma4Config.from_hf_dict(hf_config_dict(cfg), name=name)
    assert back.replace(architecture=cfg.architecture) == cfg


def test_export_refuses_what_the_flat_form_cannot_say():
    cfg = Gemma4Config.from_hf_dict(PRESETS["e4b"])
    odd = cfg.replace(layers=(cfg.layers[0].__class__(**{**cfg.layers[0].__dict__, "mlp_width": 7}),
                              *cfg.layers[1:]))
    with pytest.raises(gemma4_jax.ConfigError):
        hf_config_dict(odd)
