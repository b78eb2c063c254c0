"""Pipeline parallelism on 4 simulated CPU devices: every split gives the single-stage logits and tokens."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import rel_err, xla_flags

import gemma4_jax
from gemma4_jax.checkpoint.staged import convert
from gemma4_jax.config import Gemma4Config, preset
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model.text import abstract_model, count_params
from gemma4_jax.parallel.pipeline import PipelinePlan
from gemma4_jax.parallel.stages import best_stages, device_param_bytes, parse_layer_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32, max|Δ| relative to the largest logit. Not 1e-5: XLA's float32 floor on these models is
# about 2e-5 — the single-stage model itself differs by 1.9e-5 (E2B-like) between batch 1 and batch 4,
# and a split changes matmul shapes (micro-batches, padded PLE slices) in the same way.
BOUND = 3e-5

# (family, pp, layer_split or None for the balanced split). The E2B-like model's layers 6-9 read the
# K/V of layers 4 and 5; the E4B-like model's 8-11 read 6 and 7.
SPLITS = [
    ("e2b", 2, None), ("e2b", 4, None), ("e2b", 2, "0,5,10"), ("e2b", 2, "0,7,10"), ("e4b", 3, "0,7,9,12"),
    ("e4b", 4, "0,3,6,8,12"), ("26b-a4b", 3, "0,1,5,6"), ("31b", 2, "0,11,12"), ("31b", 4, None),
]
IDS = np.random.default_rng(0).integers(3, 256, size=(4, 13))
PROMPTS = [[2, 5, 9, 33, 7], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [2, 3], [2, 100, 101, 102]]


pytestmark = pytest.mark.xdist_group("pipeline")  # one worker builds the pp = 1 references (`single`) once


@pytest.fixture(scope="module")
def single(hf_dirs):
    """pp=1 references: logits of IDS and greedy tokens of PROMPTS (20 new tokens, past the window of 8)."""
    out = {}
    for fam in ("e2b", "e4b", "26b-a4b", "31b"):
        m = gemma4_jax.load(hf_dirs[fam, "causal"], progress=False)
        out[fam] = (m.logits(IDS), m.generate(PROMPTS, max_new_tokens=20, stop_tokens=()))
    return out


@pytest.mark.parametrize("name,stages,ratio", [("e4b", 2, 0.57), ("26b-a4b", 2, 0.55), ("31b", 2, 0.55),
                                               ("31b", 4, 0.34), ("e2b", 4, 0.42)])
def test_real_shape_weights_per_device(name, stages, ratio):
    """Per-device parameter bytes of the real variants at their best split, against the whole model."""
    cfg = preset(name)
    plan = PipelinePlan(cfg, best_stages(cfg, stages, 2))
    if name == "e4b":  # KV-shared layers are stored with their owning kind (no double-wide MLP there)
        assert len(plan.stacks) == 2 < len(cfg.layer_kinds)
    assert device_param_bytes(cfg, plan.stages, 2) <= ratio * count_params(abstract_model(cfg)) * 2


def test_plans_cover_the_cross_stage_kv_sources(hf_dirs):
    cfg = Gemma4Config.from_json(hf_dirs["e2b", "causal"])
    assert PipelinePlan(cfg, parse_layer_split("0,5,10", 10)).xfer == (4,)
    assert PipelinePlan(cfg, parse_layer_split("0,7,10", 10)).xfer == (4, 5)
    assert PipelinePlan(cfg, parse_layer_split("0,3,10", 10)).xfer == ()
    plan = PipelinePlan(cfg, parse_layer_split("0,7,10", 10))
    assert set(plan.cache_slots[1]) == {4, 5}  # the reader stage mirrors both sources


@pytest.mark.parametrize("family,pp,split", SPLITS)
def test_every_split_gives_single_stage_logits(hf_dirs, single, family, pp, split):
    m = gemma4_jax.load(hf_dirs[family, "causal"], pp=pp, layer_split=split, progress=False)
    assert m.pipeline.num_stages == pp
    got = m.logits(IDS)
    assert rel_err(got, single[family][0]) <= BOUND
    # The weights are really split: each stage's block lives on its own device, and holds exactly the
    # bytes the layout says (what the real-shape memory figures below are computed from).
    blocks = m.pipeline.params["table"].addressable_shards
    assert sorted(sh.device.id for sh in blocks) == [d.id for d in jax.devices()[:pp]]
    per_device = {}
    for leaf in jax.tree.leaves(m.pipeline.params):
        for sh in leaf.addressable_shards:
            per_device[sh.device.id] = per_device.get(sh.device.id, 0) + sh.data.nbytes
    assert set(per_device.values()) == {device_param_bytes(m.pipeline.plan.cfg, m.pipeline.plan.stages, 4)}


@pytest.mark.parametrize("family,pp,split", [
    ("e2b", 2, "0,7,10"), ("e4b", 3, "0,7,9,12"), ("26b-a4b", 2, None), ("31b", 4, None),
])
def test_every_split_gives_single_stage_tokens(hf_dirs, single, family, pp, split):
    m = gemma4_jax.load(hf_dirs[family, "causal"], pp=pp, layer_split=split, progress=False)
    want = single[family][1]
    assert m.generate(PROMPTS, max_new_tokens=20, stop_tokens=()) == want  # the ring, several micro-batches
    if family == "e2b":  # one prompt walks the stages
        assert m.generate(PROMPTS[1:2], max_new_tokens=20, stop_tokens=()) == want[1:2]


@pytest.mark.devices(2)
def test_raw_queries_through_the_ring(hf_dirs, single, monkeypatch):
    """With the decode kernel's prologue on (`dispatch.DECODE_QUERY_PROLOGUE`), the ring's decode hands its attender
    raw queries and keys (`Queries`, `Keys`) and writes the cache from their value; on the CPU XLA attends to the
    queries' value: the single-stage tokens."""
    from gemma4_jax.kernels import dispatch

    monkeypatch.setattr(dispatch, "DECODE_QUERY_PROLOGUE", True)
    m = gemma4_jax.load(hf_dirs["e2b", "causal"], pp=2, layer_split="0,7,10", progress=False)
    assert m.generate(PROMPTS[1:2], max_new_tokens=20, stop_tokens=()) == single["e2b"][1][1:2]


@pytest.mark.devices(2)
def test_continuous_batching_in_the_ring_after_a_shared_prefix(hf_dirs):
    """The engine at pp = 2 (`generate_continuous`): a 21-token shared prefix (past the window of 8: the ring
    buffers wrap) prefilled once, then each prompt's own tokens through GPipe's extend mode (the longer ones in
    pieces of 4, each continuing its own cache) — with KV-sharing readers on the later stage whose sources'
    mirrors hold the prefix (E2B-like split 0,7,10) — and decoded in the ring's rows: pp = 1's greedy tokens."""
    family, split = "e2b", "0,7,10"
    rng = np.random.default_rng(7)
    head = [2, *rng.integers(3, 256, size=20).tolist()]
    prompts = [head + rng.integers(3, 256, size=int(k)).tolist() for k in (3, 11, 1, 6)]
    limits = [12, 5, 9, 3]
    one = gemma4_jax.load(hf_dirs[family, "causal"], progress=False)
    want = [w[:m] for w, m in zip(one.generate(prompts, max_new_tokens=12, stop_tokens=()), limits, strict=True)]
    m = gemma4_jax.load(hf_dirs[family, "causal"], pp=2, layer_split=split, progress=False)
    stats = {}
    got = m.generate_continuous(prompts, max_new_tokens=limits, slots=2, stop_tokens=(), shared_prefix=True,
                                stats=stats, prefill_chunk=4)  # the 11 and 6 own tokens: in pieces of 4
    assert got == want and stats["prefix_tokens"] == 21


@pytest.mark.devices(2)
def test_stop_tokens_end_sequences_in_the_ring(hf_dirs, single):
    want = single["e2b"][1]
    stop = want[0][5]
    m = gemma4_jax.load(hf_dirs["e2b", "causal"], pp=2, progress=False)
    got = m.generate(PROMPTS, max_new_tokens=20, stop_tokens=(stop,))
    for g, w in zip(got, want, strict=True):
        cut = w.index(stop) + 1 if stop in w else len(w)
        assert g == w[:cut]


@pytest.mark.devices(2)
def test_the_ring_streams_what_one_call_returns(hf_dirs, single):
    """At pp = 2, `on_tokens` gets the first token, then each ring call's chunk of 8 as it returns; put together,
    the blocks are the generation's tokens: pp = 1's greedy ones, cut at a stop token (a row that stopped repeats
    it), and a sampled generation's own unstreamed tokens (the chunks sample with the keys of one call). The
    CLI's single prompt walking the stages: test_cli_first_hour's pp 2 test."""
    want = single["e2b"][1]
    m = gemma4_jax.load(hf_dirs["e2b", "causal"], pp=2, progress=False)
    stop = want[0][11]
    sampled = dict(stop_tokens=(), temperature=0.9, seed=3)
    cases = ((dict(stop_tokens=()), want),
             (dict(stop_tokens=(stop,)), [w[:w.index(stop) + 1] if stop in w else w for w in want]),
             (sampled, m.generate(PROMPTS, max_new_tokens=20, **sampled)))
    for kw, whole in cases:
        blocks = []
        got = m.generate(PROMPTS, max_new_tokens=20, on_tokens=blocks.append, **kw)
        sizes = [b.shape[1] for b in blocks]
        assert got == whole and sizes[:2] == [1, 8] and (kw["stop_tokens"] or sizes == [1, 8, 8, 3]), sizes
        streamed = np.concatenate(blocks, axis=1)
        for row, w in zip(streamed, whole, strict=True):
            assert row[:len(w)].tolist() == w and set(row[len(w):].tolist()) <= {w[-1]}
    assert cases[2][1] != want  # the sampled case samples


@pytest.mark.devices(3)
def test_converted_stages_load_onto_their_devices(hf_dirs, single, tmp_path):
    out = str(tmp_path / "conv")
    convert(hf_dirs["e4b", "wrapper"], out, parse_layer_split("0,7,9,12", 12), progress=False, log=lambda s: None)
    m = gemma4_jax.load(out, pp=3, progress=False)
    assert rel_err(m.logits(IDS), single["e4b"][0]) <= BOUND
    with pytest.raises(Gemma4Error, match="converted for pp=3 but pp=2 was asked"):
        gemma4_jax.load(out, pp=2)


def test_bad_pp_is_one_sentence(hf_dirs):
    n = len(jax.devices())  # 4 on the CPU (conftest); a GPU machine's own count
    if n + 1 > 10:  # the test model's layers: past them, pp's layer sentence comes first (test_convert.py)
        pytest.skip(f"{n} devices: pp={n + 1} exceeds the test model's 10 layers")
    with pytest.raises(Gemma4Error, match=f"pp={n + 1} needs {n + 1} devices but only {n} (is|are) visible"):
        gemma4_jax.load(hf_dirs["e2b", "causal"], pp=n + 1)
    with pytest.raises(Gemma4Error, match="makes 3 stages but pp=2"):
        gemma4_jax.load(hf_dirs["e2b", "causal"], pp=2, layer_split="0,3,6,10")


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]])
@pytest.mark.devices(2)
def test_stage_programs_close_over_no_empty_constant(hf_dirs, prompts):
    """XLA's GPU partitioner (Shardy, jax 0.11) segfaults on an empty constant inside shard_map, such as
    the index of a full-range `.at[:n].set`. Neither the GPipe prefill nor the ring may contain one."""
    from gemma4_jax.generation.loop import Sampling
    from gemma4_jax.parallel import pipeline as pl

    pipe = gemma4_jax.load(hf_dirs["e2b", "causal"], pp=2, progress=False).pipeline
    m = pipe.micro_batches(len(prompts))
    ids, lengths = pipe.replicated(np.ones((m, 1, 16), np.int32), np.full((m, 1), 5, np.int32))
    cache = pl.init_stage_cache(pipe.plan, pipe.mesh, m, 1, 32, pipe.dtype)
    statics = dict(plan=pipe.plan, dtype_name=pipe.dtype.name, impl="xla", mesh=pipe.mesh)
    texts = [pl._run_gpipe.lower(pipe.params, ids, lengths, cache if mode == "prefill" else None, mode=mode,
                                 **statics).as_text() for mode in ("prefill", "logits")]
    first, left, stops, key, offset = pipe.replicated(np.ones((m, 1), np.int32), np.full((m, 1), 7, np.int32),
                                                      np.array([-1], np.int32), jax.random.key(0),
                                                      np.asarray(0, np.int32))
    texts.append(pl._run_ring.lower(pipe.params, cache, first, lengths, left, stops, key, offset,
                                    sampling=Sampling(0.0, None, None), width=8, **statics).as_text())
    # Layer weights reach the programs as one array per slot: a stack [n, ...] would be sliced per layer,
    # which on the GPU copies the weight every tick.
    stacked = set()
    for kind, n in pipe.plan.kind_max.items():
        one = jax.tree.leaves(nnx.state(pl.kind_graphdef(pipe.plan.cfg, kind, 1, pipe.dtype)))
        for shape in (leaf.shape[1:] for leaf in one if n > 1 and len(leaf.shape) >= 3):  # the matrices
            dims = "x".join(map(str, (n, *shape))) + "x"
            stacked |= {f"tensor<{dims}", f"tensor<1x{dims}"}  # the stack, or its block inside shard_map
    assert any(n > 1 for n in pipe.plan.kind_max.values())
    for text in texts:
        assert "manual" in text  # the stage program itself was lowered
        assert "tensor<0x" not in text
        assert not [t for t in stacked if t in text]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_pipeline_across_processes(hf_dirs, single, tmp_path):
    """Two processes (hosts) of 2 CPU devices each, joined by `jax.distributed.initialize` (gloo collectives),
    run pp=4 with two stages on each, from the HF directory and from a converted 4-stage checkpoint (each
    process restores only its own stages); both read pp=1's logits and greedy tokens. E2B-like: the split
    puts KV-sharing sources and readers on different stages, so the packet and the mirrors cross processes."""
    import json

    hf = hf_dirs["e2b", "causal"]
    converted = str(tmp_path / "stages")
    convert(hf, converted, pp=4, progress=False, log=lambda s: None)
    (tmp_path / "inputs.json").write_text(json.dumps({"ids": IDS.tolist(), "prompts": PROMPTS, "new_tokens": 20}))
    port, outs = _free_port(), [str(tmp_path / f"p{i}.npz") for i in range(2)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), str(i), str(port),
                               outs[i], hf, converted], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    cfg = Gemma4Config.from_json(hf)
    plan = PipelinePlan(cfg, best_stages(cfg, 4, 4))
    assert plan.xfer, "premise: this split sends KV sources' K/V between stages"
    ref_logits, ref_tokens = single["e2b"]
    for out in outs:
        got = np.load(out)
        for i in range(2):  # the HF directory, the converted checkpoint
            assert rel_err(got[f"logits{i}"], ref_logits) <= BOUND
            assert got[f"tokens{i}"].tolist() == ref_tokens


def _without_gloo(out: str) -> str:
    out = re.sub(r"\[Gloo\] Rank \n?", "", out)
    # the rank's digits may have gone out with the "[Gloo] Rank " write, leaving " is connected to …" on its own, and
    # the peer count's with another ("1 is connected to  peer ranks. …")
    out = re.sub(r"\d*[ \t]*is connected to[ \t]*\d*[ \t]*peer ranks\. Expected number of connected peer ranks is :"
                 r"[ \t]*\d*\n?", "", out)
    return "".join(line for line in out.splitlines(keepends=True) if not line.startswith("[Gloo]"))


def test_generate_cli_across_processes():
    """`python -m gemma4_jax.generate --coordinator … --pp 4` on two processes (2 CPU devices each): process 0
    prints the single-process text, process 1 prints nothing."""
    cmd = [sys.executable, "-m", "gemma4_jax.generate", "--prompt", "What is 7 + 5?", "--max-new-tokens", "10"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    one = subprocess.run(cmd, env={**env, "XLA_FLAGS": xla_flags(1)},
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen(cmd + ["--pp", "4", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                                     "--process-id", str(i)],
                              env={**env, "XLA_FLAGS": xla_flags(2)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    # gloo (CPU collectives only) prints its connections to stdout from C++, at times split across writes that
    # interleave with other output ("[Gloo] Rank " on one line, "2 is connected to …" on the next); the text is
    # the rest
    # the rest, up to blank lines: a gloo line's newline can be left behind when its text went out in pieces
    text = [[line for line in _without_gloo(o).splitlines() if line.strip()] for o, _ in outs]
    assert one.stdout.strip() and text[0] == [line for line in one.stdout.splitlines() if line.strip()]
    assert text[1] == []


def test_generate_cli_cluster_flags_go_together(capsys):
    """Refused with the other flag checks, before the compile cache is set up (in this process: a later test's
    generation must not find a program store it did not ask for)."""
    from gemma4_jax.generate import main
    from gemma4_jax.generation import programs

    before = os.environ.get(programs.ENV)
    assert main(["--prompt", "hi", "--coordinator", "localhost:1234"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --coordinator, --num-processes and --process-id go together"
    assert os.environ.get(programs.ENV) == before


def test_gsm8k_eval_across_processes(tmp_path):
    """`tools/eval_gsm8k.py --coordinator … --pp 2 --engine` on two processes (a stage each): process 0 writes
    the single-process run's records (static batches, pp = 1) and summary; process 1 writes nothing. The engine's
    slots are the ring's rows, the hosts' schedulers in step. (Zero-shot engine records at pp = 2: this test;
    few-shot: test_gsm8k's.)"""
    import json

    from gemma4_jax.evals import gsm8k

    data = "/work/shared/data/gsm8k/test.jsonl"
    if not os.path.exists(data):
        pytest.skip("GSM8K data not present")
    kw = dict(limit=3, batch_size=2, max_new_tokens=16, progress=False, log=lambda s: None)
    ref = gsm8k.run_eval(None, data, out=str(tmp_path / "one.json"), **kw)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(1), "TOKENIZERS_PARALLELISM": "false"}
    port, outs = _free_port(), [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "eval_gsm8k.py"), "--data", data,
                               "--limit", "3", "--batch-size", "2", "--max-new-tokens", "16", "--quiet", "--pp", "2",
                               "--engine",
                               "--out", str(outs[i]), "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    got = json.loads(outs[0].read_text())
    assert [r["output"] for r in got["records"]] == [r["output"] for r in ref["records"]]
    assert got["correct"] == ref["correct"] and got["total"] == 3
    assert not outs[1].exists() and not os.path.exists(gsm8k.records_path(str(outs[1])))
