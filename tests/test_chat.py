"""Chat prompts as transformers renders them (`gemma4_jax.chat`), and thinking mode end to end: a checkpoint whose
greedy output opens with a thought channel, through `generate_text`, the CLI and the GSM8K evaluation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gemma4_jax
from gemma4_jax.chat import ThoughtStream, render, split_thoughts
from gemma4_jax.errors import ConfigError
from gemma4_jax.testing.tiny import THINKING, write_char_tokenizer
from gemma4_jax.tokenizer import Tokenizer, builtin_chat_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A template written for these tests that uses every feature of transformers' environment a Gemma 4 template
# may: loop controls, `tojson` plain and with keyword arguments (non-ASCII and <>&' unescaped), `strftime_now`,
# `raise_exception`, image and audio parts, tools, tool calls and tool turns, thinking on and off, and earlier
# thoughts (passed under an older field name, which transformers aliases to `reasoning_content`).
TEMPLATE = """{{ bos_token }}
{%- if tools or enable_thinking or messages[0]['role'] == 'system' %}<|turn>system
{% if enable_thinking %}<|think|>
{% endif %}
{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}{% endif %}
{%- for t in tools or [] %}<|tool>{{ t | tojson(ensure_ascii=False) }}<tool|>{% endfor %}<turn|>
{% endif %}
{%- for m in messages %}
{%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}
{{ raise_exception('no role ' ~ m['role']) }}{% endif %}
{%- if m['role'] == 'system' %}{% continue %}{% endif %}
<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}
{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}
{%- for p in m['content'] %}
{%- if p['type'] == 'text' %}{{ p['text'] | trim }}{% elif p['type'] == 'image' %}

<|image|>

{% elif p['type'] == 'audio' %}<|audio|>{% endif %}
{%- endfor %}{% endif %}
{%- if m['role'] == 'assistant' and m['reasoning_content'] is defined %}<|channel>thought
{{ m['reasoning_content'] }}<channel|>{% endif %}
{%- for c in m.get('tool_calls', []) %}{% if loop.index > 2 %}{% break %}{% endif %}
<|tool_call>{{ c['function'] | tojson(indent=1, sort_keys=True) }}<tool_call|>{% endfor %}
{%- if m['role'] == 'tool' %}{{ m | tojson }}{% endif %}<turn|>
{% endfor %}
{%- if add_generation_prompt %}<|turn>model
{% if not enable_thinking %}<|channel>thought
<channel|>{% endif %}{% endif %}
{%- if strftime_now('%Y') | int < 2000 %}never{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Sum <a> & 'b' — é",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
CONVERSATIONS = {
    "plain": [{"role": "user", "content": "  What is 2+3?  "}],
    "system and turns": [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sum 2 and 3."}],
    "parts": [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                           {"type": "text", "text": " with "}, {"type": "image"},
                                           {"type": "audio"}, {"type": "text", "text": "please"}]}],
    "tools": [{"role": "user", "content": "Add 2 and 3"},
              {"role": "assistant", "content": "", "thinking": "I should call add.",
               "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}] * 3},
              {"role": "tool", "name": "add", "content": "5 <ok> & 'done'"}],
}


def _hf_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), bos_token="<bos>",
                                  eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    return tok


def _hf_messages(messages):
    """The messages as this transformers takes them: a transformers that does not yet alias an earlier thought's
    older field names to `reasoning_content` (5.17, on the GPU machines, passes `thinking` through unread) gets
    the thought under `reasoning_content` too, so its rendering shows what a current transformers renders; ours
    always gets the messages as written."""
    from transformers.utils import chat_template_utils

    if hasattr(chat_template_utils, "_alias_reasoning_fields"):
        return messages
    return [{**m, "reasoning_content": m["thinking"]} if m.get("thinking") is not None and
            m.get("reasoning_content") is None else m for m in messages]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat_tok"))
    write_char_tokenizer(path, 256, extra={**THINKING, 255: "<|image|>", 254: "<|audio|>", 253: "<|tool>"})
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(TEMPLATE)
    return path


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers(tok_dir, name, thinking, generation_prompt):
    ours = Tokenizer(tok_dir)
    hf = _hf_tokenizer(tok_dir)
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    kw = dict(add_generation_prompt=generation_prompt, enable_thinking=thinking, tools=tools)
    want = hf.apply_chat_template(_hf_messages(messages), tokenize=False, **kw)
    got = ours.apply_chat_template(messages, **kw)
    assert got == want
    ids = hf.apply_chat_template(_hf_messages(messages), tokenize=True, return_dict=False, **kw)
    assert ours.encode(got) == list(ids)
    if name == "tools":  # the features the old environment lacked are really exercised
        assert "é" in got and "<a> & 'b'" in got and got.count("<|tool_call>") == 2 and "I should call add." in got
    if thinking:
        assert "<|think|>" in got


def test_bad_conversations_are_one_sentence(tok_dir):
    ours = Tokenizer(tok_dir)
    with pytest.raises(ConfigError, match="the conversation is empty"):
        ours.apply_chat_template([])
    with pytest.raises(ConfigError, match="refused the conversation: no role narrator"):
        ours.apply_chat_template([{"role": "narrator", "content": "Once"}])
    with pytest.raises(ConfigError, match="must be a dict with a 'role'"):
        ours.apply_chat_template(["hi"])
    with pytest.raises(ConfigError, match=r"^the conversation must be a list of messages, got str 'hi'$"):
        ours.apply_chat_template("hi")
    for content in (5, ["text"]):  # the template raised a TypeError on these
        with pytest.raises(ConfigError, match="^a message's content must be text or a list of parts .* in the user "):
            ours.apply_chat_template([{"role": "user", "content": content}])
        with pytest.raises(ConfigError, match="^a message's content must be text"):
            builtin_chat_prompt([{"role": "user", "content": content}])
    with pytest.raises(ConfigError, match="cannot be parsed"):
        render("{% for %}", [{"role": "user", "content": "x"}])


def test_builtin_format_thinking_and_earlier_thoughts():
    msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hello"},
            {"role": "user", "content": "2+3?"}]
    assert builtin_chat_prompt(msgs, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"
        "<|turn>user\n2+3?<turn|>\n<|turn>model\n")
    assert builtin_chat_prompt(msgs[1:2]) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    # 26B/31B's format: an empty thought channel after the generation prompt when thinking is off
    assert builtin_chat_prompt(msgs[1:2], empty_thoughts=True).endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert builtin_chat_prompt(msgs[1:2], enable_thinking=True, empty_thoughts=True).endswith("<|turn>model\n")
    assert builtin_chat_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                               add_generation_prompt=False) == "<bos><|turn>user\n<|image|>What?<turn|>\n"


@pytest.mark.parametrize("text,thoughts,answer", [
    ("<|channel>thought\nLet me add.<channel|>The answer is 5.", "Let me add.", "The answer is 5."),
    ("The answer is 5.", "", "The answer is 5."),
    ("<|channel>thought\nstill thinking", "still thinking", ""),
    ("<|channel>thought\n<channel|>\n\nX", "", "X"),
])
def test_thoughts_split_whole_and_streamed(text, thoughts, answer):
    assert split_thoughts(text) == (thoughts, answer)
    for step in (1, 2, 5, len(text) or 1):
        a, t = [], []
        stream = ThoughtStream(a.append, t.append)
        for i in range(0, len(text), step):
            stream.push(text[i:i + step])
        stream.flush()
        assert ("".join(t).strip(), "".join(a)) == (thoughts, answer), step


# --- a checkpoint that thinks: greedy output is <|channel>xy<channel|>AB<turn|> after any chat prompt ---------

def _bigram_checkpoint(path: str) -> dict[str, int]:
    """A real HF checkpoint whose greedy continuation of a chat prompt is a fixed thought channel then an answer:
    the layers' output projections are zero (the stream stays the token's embedding, so the next token depends
    on the last one only), and the untied head maps each token of the chain to the next."""
    import torch
    from transformers import Gemma4ForCausalLM

    from gemma4_jax.testing.tiny import tiny_text_config

    write_char_tokenizer(path, 256, extra=THINKING)
    tok = Tokenizer(path)
    chain = [tok.encode(s, add_bos=False)[0] for s in ["\n", "<|channel>", "x", "y", "<channel|>", "A", "B", "<turn|>"]]
    torch.manual_seed(0)
    cfg = tiny_text_config(num_hidden_layers=1, layer_types=["full_attention"], num_kv_shared_layers=0,
                           hidden_size_per_layer_input=0, tie_word_embeddings=False)
    model = Gemma4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.normal_(0, 0.02)
        for a, b in zip(chain, chain[1:], strict=False):
            head[b] = 2.0 * emb[a] / emb[a].norm()
    model.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}, f)
    return dict(zip(["nl", "open", "x", "y", "close", "A", "B", "end"], chain, strict=True))


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("thinker"))
    _bigram_checkpoint(path)
    return path


def test_generate_text_returns_the_answer_and_thoughts_on_request(thinker):
    model = gemma4_jax.load(thinker, progress=False)
    raw = model.generate([model.tokenizer.encode_chat("Hi", enable_thinking=True)], max_new_tokens=12)[0]
    assert model.tokenizer.decode(raw) == "<|channel>xy<channel|>AB<turn|>"  # the checkpoint does think
    assert model.generate_text(["Hi"], thinking=True, max_new_tokens=12) == ["AB"]
    assert model.generate_text(["Hi", [{"role": "user", "content": "Yo"}]], thinking=True, return_thoughts=True,
                               max_new_tokens=12) == [("AB", "xy"), ("AB", "xy")]
    assert model.tokenizer.chat_prompt("Hi", enable_thinking=True).startswith("<bos><|turn>system\n<|think|>\n")
    assert model.generate_text(["Hi"], chat=False, max_new_tokens=3) != ["AB"]  # raw text is not split


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "gemma4_jax.generate", *args], text=True, capture_output=True,
                          env=env, timeout=300)


def test_cli_think_prints_only_the_answer(thinker):
    run = _cli("--model", thinker, "--prompt", "Hi", "--think", "--max-new-tokens", "12")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "AB\n" and "xy" not in run.stderr
    run = _cli("--model", thinker, "--prompt", "Hi", "Yo", "--think", "--show-thoughts", "--max-new-tokens", "12")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "AB\nAB\n" and run.stderr.count("[thoughts] xy") == 2


def test_gsm8k_reads_the_answer_after_the_thoughts(thinker):
    from gemma4_jax.evals import gsm8k

    model = gemma4_jax.load(thinker, progress=False)
    examples = [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}]
    out = gsm8k.evaluate(model, examples, max_new_tokens=12, progress=False, thinking=True)
    rec = out["records"][0]
    assert rec["output"] == "AB" and rec["thoughts"] == "xy" and rec["settings"]["thinking"] is True
    assert np.isclose(out["accuracy"], 0.0)
