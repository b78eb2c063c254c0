"""Config parsing (both config.json forms, both checkpoint flavours) and the real presets."""

import json

import jax.numpy as jnp
import pytest
from hf_fixtures import FAMILIES

from gemma4_jax import ConfigError, Gemma4Config, preset
from gemma4_jax.config import FULL, PUBLISHED_PARAMS_B, SLIDING
from gemma4_jax.model.text import abstract_model, count_params, embed_scale


@pytest.mark.parametrize("family", list(FAMILIES))
def test_both_config_forms_and_layouts_agree(family, hf_dirs):
    a = Gemma4Config.from_json(hf_dirs[family, "causal"])  # per_layer_config form
    b = Gemma4Config.from_json(hf_dirs[family, "wrapper"])  # flat form inside text_config
    assert a.layers == b.layers
    assert a.eos_token_ids == b.eos_token_ids == (1, 106)
    assert b.architecture == "Gemma4ForConditionalGeneration"


def test_flat_and_per_layer_forms_of_31b_agree():
    flat = preset("31b")
    raw = {k: v for k, v in __import__("gemma4_jax.config", fromlist=["PRESETS"]).PRESETS["31b"].items()
           if k not in ("global_head_dim", "num_global_key_value_heads")}
    raw["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 4}
                               for i in range(60) if (i + 1) % 6 == 0}
    assert Gemma4Config.from_hf_dict(raw).layers == flat.layers


def test_e2b_derived_facts():
    c = preset("e2b")
    assert [s.index for s in c.layers if s.attn_type == FULL] == [4, 9, 14, 19, 24, 29, 34]
    assert {s.kv_source for s in c.layers[15:] if s.attn_type == SLIDING} == {13}
    assert {s.kv_source for s in c.layers[15:] if s.attn_type == FULL} == {14}
    assert all(s.owns_kv for s in c.layers[:15])
    assert [s.mlp_width for s in c.layers] == [6144] * 15 + [12288] * 20
    full = c.layers[4]
    assert (full.head_dim, full.num_kv_heads, full.rope_theta, full.rope_fraction) == (512, 1, 1e6, 0.25)
    assert c.layers[0].window == 512 and full.window is None


def test_e4b_26b_31b_derived_facts():
    e4b = preset("e4b")
    assert {s.kv_source for s in e4b.layers[24:]} == {22, 23}
    moe = preset("26b-a4b")
    assert (moe.num_experts, moe.top_k_experts, moe.moe_intermediate_size) == (128, 8, 704)
    full, slide = moe.layers[5], moe.layers[0]
    assert (full.num_kv_heads, full.k_eq_v, slide.num_kv_heads, slide.k_eq_v) == (2, True, 8, False)
    assert slide.window == 1024
    big = preset("31b")
    assert (big.layers[59].attn_type, big.layers[59].num_kv_heads, big.layers[0].num_kv_heads) == (FULL, 4, 16)


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS_B))
def test_preset_parameter_counts_match_published(name):
    n = count_params(abstract_model(preset(name))) / 1e9
    assert abs(n - PUBLISHED_PARAMS_B[name]) / PUBLISHED_PARAMS_B[name] < 0.01, n


@pytest.mark.parametrize("d,expected", [(1536, 39.25), (2560, 50.5), (2816, 53.0), (5376, 73.5)])
def test_embedding_scale_is_rounded_to_bf16(d, expected):
    assert float(embed_scale(d, jnp.bfloat16)) == expected


def test_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        Gemma4Config.from_hf_dict({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        Gemma4Config.from_hf_dict({"model_type": "gemma4_text", "hidden_size": 8})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("70b")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Gemma4Config.from_json(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        Gemma4Config.from_json(tmp_path / "nowhere")
    raw = dict(FAMILIES["31b"], model_type="gemma4_text", architectures=["Gemma4ForSequenceClassification"])
    with pytest.raises(ConfigError, match="architecture"):
        Gemma4Config.from_hf_dict(json.loads(json.dumps(raw)))
