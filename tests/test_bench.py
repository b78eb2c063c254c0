"""The benchmark tools run end to end on the CPU (the demo model's config), and their roofline arithmetic."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
from hf_fixtures import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "gemma4_jax", "demo_model", "config.json")
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _run_bench(args: list[str], devices: int = 1, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(devices)}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *args],
                          env=env, capture_output=True, text=True, timeout=600, cwd=cwd)


def _bench(args: list[str], tmp_path, devices: int = 1) -> dict:
    out = str(tmp_path / "out.json")
    run = _run_bench([*args, "--json", out], devices)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_bench_generate_runs(tmp_path):
    res = _bench(["generate", "--config", DEMO, "--batch", "1,2", "--prompt-len", "8", "--gen-len", "8",
                  "--prefill-len", "16", "--repeat", "1", "--hbm-gib", "0.0625", "--profile", str(tmp_path / "prof"),
                  "--profile-hlo", "--profile-top", "60",
                  "--gemv-max-weight", "4096", "--gemv-max-weight-batched", "2048",
                  "--one-row-padded-max-weight", "8192",
                  "--decode-kernel-min-batch", "1", "--decode-kernel-max-keys", "0",
                  "--fused-add-norm", "--gemv-min-block-n", "32", "--router-kernel", "--moe-mosaic-min-rows", "256",
                  "--no-dense-after-router", "--router-own-norm", "--gemv-min-weight", "64",
                  "--gemv-sum-in-kernel", "norm", "--one-row-stream-rows", "2",
                  "--l2-prefetch-bytes", "65536", "--l2-prefetch-programs", "8", "--l2-prefetch-loads", "2",
                  "--l2-prefetch-order", "smallest_first",
                  "--l2-prefetch-eviction", "evict_normal",
                  "--decode-xla-option", "xla_gpu_enable_triton_gemm=false",
                  "--compile-cache", str(tmp_path / "cache")],
                 tmp_path)
    # --compile-cache: generation's programs were kept there (as executables a later process loads)
    assert res["compile_cache"] == str(tmp_path / "cache") and os.listdir(tmp_path / "cache" / "programs")
    assert res["hbm_gb_s"] > 0 and res["hbm_read_gb_s"] > 0 and res["hbm_matvec_gb_s"] > 0
    # the device-timed probes, and the best of every probe as the roofline's bandwidth
    assert set(res["hbm_device_gb_s"]) == {"copy", "read", "matvec", "gemv"}
    assert all(v > 0 for v in res["hbm_device_gb_s"].values())
    assert res["hbm_best_gb_s"] == max(res["hbm_gb_s"], res["hbm_read_gb_s"], res["hbm_matvec_gb_s"],
                                       *res["hbm_device_gb_s"].values())
    assert res["decode_scheduling"] == "CONCURRENT"  # the library's default, recorded
    assert res["gemv_max_weight"] == 4096 and res["gemv_max_weight_batched"] == 2048
    assert res["one_row_padded_max_weight"] == 8192
    assert res["decode_kernel_min_batch"] == 1
    assert res["decode_kernel_max_keys"] == 0  # 0 is a value, not "the library's default"
    assert res["fused_add_norm"] and res["gemv_min_block_n"] == 32 and res["gemv_max_split_k"] == 64
    assert res["router_kernel"] is True and res["moe_mosaic_min_rows"] == 256
    assert res["dense_after_router"] is False and res["router_own_norm"] is True and res["gemv_min_weight"] == 64
    assert res["gemv_sum_in_kernel"] == "norm" and res["one_row_stream_rows"] == 2
    assert res["l2_prefetch_bytes"] == 65536 and res["l2_prefetch_programs"] == 8 and res["l2_prefetch_loads"] == 2
    assert res["l2_prefetch_order"] == "smallest_first"
    assert res["l2_prefetch_eviction"] == "evict_normal"
    assert res["decode_xla_options"] == {"xla_gpu_enable_triton_gemm": False}  # parsed as XLA takes it: a bool
    for b in ("1", "2"):
        r = res["results"][b]
        assert r["decode_tokens_s"] * r["decode_ms_per_token"] / 1e3 == pytest.approx(int(b))
        assert r["roofline_ms_per_token"] > 0 and r["prefill_ms"] > 0 and r["compile_s"] > -1
        assert len(r["tokens_sha1"]) == 40 and r["tokens_same_in_process"] is True  # the CPU is deterministic
        # the best probe's roofline: never slower than the copy's or the read's
        slowest = min(r["roofline_ms_per_token"], r["read_roofline_ms_per_token"])
        assert 0 < r["best_roofline_ms_per_token"] <= slowest * (1 + 1e-9)
    assert res["long_prefill"]["ms"] > 0 and res["long_prefill"]["tokens"] == 16
    kernels = res["profile"]["kernels"]  # tools/trace_summary.py read the trace
    assert kernels and sum(k["share"] for k in kernels) <= 1.0 + 1e-9 and all(k["count"] > 0 for k in kernels)
    prof = res["profile"]  # the op classes add up to the whole; a decode step runs kernels
    assert sum(c["total_us"] for c in prof["classes"].values()) == pytest.approx(prof["device_busy_us"], rel=1e-3)
    assert sum(c["count"] for c in prof["classes"].values()) == prof["kernel_count"]
    assert prof["decode_step"]["steps"] == 32 and set(prof["decode_step"]["classes"]) == set(prof["classes"])
    # Every step's kernels are in the trace (with the Python tracer on, the CPU trace lost them: 0.8 a step)
    assert prof["decode_step"]["kernels"] >= 1 and prof["decode_step"]["busy_us"] > 0
    assert isinstance(prof["decode_step"]["between_anchors"], dict) and isinstance(prof["kernel_args"], dict)
    # --profile-hlo: the decode program's dump names what its kernels run, by the model's named scopes
    assert glob.glob(str(tmp_path / "prof" / "hlo" / "*jit_decode_chunk*after_optimizations.txt"))
    assert res["xla_flags"].endswith("--xla_dump_hlo_module_re=decode_chunk")
    scoped = [k["hlo"] for k in kernels if "hlo" in k]
    assert prof["hlo_annotated"] == len(scoped) > 0
    parts = {s.split("/")[1] for h in scoped for s in h["scopes"] if s.startswith("layer_*/")}
    assert {"attention", "mlp"} <= parts, scoped


def test_bench_chain_runs(tmp_path):
    """`bench.py chain` on the CPU: every layer puts kernels on the decode step's critical path, the layers' and
    the rest's add up to it, and --layer lists that layer's in order; the decode flags reach the dispatcher."""
    cfg = json.load(open(DEMO))
    res = _bench(["chain", "--config", DEMO, "--batch", "1,2", "--context", "32", "--layer", "1",
                  "--one-row-stream-rows", "2", "--decode-xla-option", "xla_gpu_graph_min_graph_size=2"], tmp_path)
    assert "ONE_ROW_STREAM_ROWS=2" in res["settings"] and "TARGET_GPU=None" in res["settings"]
    assert res["decode_xla_options"] == {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT",
                                         "xla_gpu_graph_min_graph_size": 2}  # compiled as the decode loop is
    assert res["target"] == "cpu" and res["context"] == 32
    layers = cfg.get("text_config", cfg)["num_hidden_layers"]
    for b in ("1", "2"):
        r = res["results"][b]
        assert r["kernels"] == sum(r["kinds"].values()) >= r["critical_path"] >= layers
        assert sorted(r["per_layer"], key=int) == [str(i) for i in range(layers)]
        assert all(n >= 1 for n in r["per_layer"].values())
        assert sum(r["per_layer"].values()) + r["outside_layers"] == r["critical_path"]
        assert len(r["layer_chain"]) == r["per_layer"]["1"] and r["compile_s"] > 0


def test_bench_chain_h200_without_the_cuda_plugin_says_so(tmp_path):
    """--target h200 where jax has no CUDA plugin (CI): one sentence naming what to install, exit 1, no JSON."""
    import importlib.util

    if importlib.util.find_spec("jax_plugins") is not None:
        pytest.skip("a jax plugin (CUDA's?) is installed here")
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "chain", "--config", DEMO,
                          "--batch", "1", "--target", "h200", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "needs jax's CUDA plugin" in run.stderr.strip().splitlines()[-1]
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")


def test_chain_critical_path_is_the_longest_dependent_chain():
    """The program-order pass finds the longest chain of kernels: against a recursive search from every
    instruction's operands (no use of program order), on the demo model's compiled decode step; and each kernel
    on the path reads the one before it through free instructions only."""
    import functools

    import bench_chain as bc

    from gemma4_jax.config import Gemma4Config

    text = bc.compile_step(Gemma4Config.from_json(DEMO), 1, 32, "auto", "device")
    ins = bc.entry_instructions(text)
    by_name = {i["name"]: i for i in ins}
    assert len(ins) == len(by_name) > 50 and all(a in by_name for i in ins for a in i["operands"])

    @functools.cache
    def longest(name):  # kernels on the longest chain ending at `name`
        i = by_name[name]
        return (i["opcode"] not in bc.FREE) + max((longest(a) for a in i["operands"]), default=0)

    sys.setrecursionlimit(100000)
    path = bc.critical_path(ins)
    assert len(path) == max(longest(n) for n in by_name)

    def reads(name, target):  # `name` reads `target` directly or through free instructions
        return any(a == target or (by_name[a]["opcode"] in bc.FREE and reads(a, target))
                   for a in by_name[name]["operands"])

    assert all(reads(b["name"], a["name"]) for a, b in zip(path, path[1:], strict=False))


def test_trace_summary_classes_and_idle_time():
    """Op classes by kernel name, and the idle time between kernels that overlap or leave gaps."""
    from trace_summary import _idle_us, op_class

    assert [op_class(n) for n in ("gemv_2560x2048", "gemm_fusion_dot", "nvjet_sm90_tst", "decode_attention",
                                  "input_reduce_fusion", "loop_multiply_fusion", "loop_dynamic_update_slice_fusion",
                                  "moe_gate_up", "loop_gather_fusion")] == [
        "gemv_pallas", "gemm", "gemm", "attention", "reduction", "elementwise", "copy", "moe", "gather_scatter"]
    assert _idle_us([(0, 10), (5, 12), (20, 25), (30, 31)]) == 8 + 5


@pytest.mark.skipif(not os.path.exists("/work/shared/data/gsm8k/test.jsonl"), reason="GSM8K data not present")
def test_bench_eval_runs(tmp_path):
    res = _bench(["eval", "--config", DEMO, "--data", "/work/shared/data/gsm8k/test.jsonl", "--questions", "2",
                  "--shots", "0", "--slots", "2", "--max-new-tokens", "4"], tmp_path)
    assert set(res["modes"]) == {"static", "engine"} and 0 <= res["same_answers"] <= 1
    eng = res["modes"]["engine"]
    assert eng["questions_s"] > 0 and 0 < eng["prefix_tokens"] and eng["prefill_tokens"] < eng["prompt_tokens"]
    for mode in res["modes"].values():  # each mode traces and compiles its own programs, counted apart
        assert 0 < mode["compile_s"] < mode["wall_s"] and mode["questions_s_compiled"] > mode["questions_s"]
    assert res["engine_vs_static_compiled"] > 0


def test_bench_startup_runs_the_cli_twice_from_one_compile_cache(tmp_path):
    """A random checkpoint of the demo config, the CLI run twice with one compile cache: both runs answer the same,
    their times are read from the CLI's own line, and the temporary checkpoint and cache are gone afterwards."""
    work = tmp_path / "work"
    work.mkdir()
    res = _bench(["startup", "--config", DEMO, "--runs", "2", "--max-new-tokens", "4", "--workdir", str(work)],
                 tmp_path)
    assert len(res["runs"]) == 2 and res["same_answer"] and res["runs"][0]["answer"].strip()
    assert all(r["time_to_first_token_s"] > 0 and r["loaded_s"] > 0 for r in res["runs"])
    assert res["second_over_first_ttft"] > 0 and res["checkpoint_gib"] > 0
    assert not list(work.iterdir()), "the temporary checkpoint was left behind"


def test_trace_bursts_split_at_idle_gaps():
    from trace_summary import bursts

    ev = [(0.0, 5.0, "a"), (3.0, 10.0, "b"), (20.0, 1.0, "c"), (200.0, 2.0, "d"), (203.0, 1.0, "e")]
    assert [[e[2] for e in g] for g in bursts(ev, gap_us=50.0)] == [["a", "b", "c"], ["d", "e"]]
    assert [[e[2] for e in g] for g in bursts(ev, gap_us=5.0)] == [["a", "b"], ["c"], ["d", "e"]]


def test_trace_spans_keep_work_between_the_jobs_out():
    """A long event that starts in the pause between two annotated jobs joins them into one burst; split by the
    jobs' spans it belongs to neither, and each job keeps its own kernels (padding included)."""
    from trace_summary import bursts, in_spans

    ev = [(0.0, 5.0, "a"), (8.0, 2.0, "b"), (30.0, 250.0, "stray"), (290.0, 3.0, "c"), (299.0, 1.0, "d")]
    assert len(bursts(ev, gap_us=25.0)) == 1
    groups = in_spans(ev, [(1.0, 12.0), (295.0, 310.0)], pad_us=5.0)
    assert [[e[2] for e in g] for g in groups] == [["a", "b"], ["c", "d"]]


def test_device_events_read_the_gpu_and_else_the_xla_threads():
    """A GPU trace's kernels are its device processes' events; where those hold none (programs run on the CPU of a
    machine with GPUs, whose trace still lists them) they are the XLA threads' events, as in a CPU-only trace."""
    from trace_summary import device_events

    def meta(kind, pid, name, tid=None):
        return {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}, **({} if tid is None else {"tid": tid})}

    def ev(pid, tid, ts, name):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": 2.0, "name": name}

    host = [meta("process_name", 1, "/host:CPU"), meta("thread_name", 1, "tf_XLACpuThreadPool/1", tid=7),
            meta("thread_name", 1, "python", tid=8), ev(1, 7, 5.0, "fusion.1"), ev(1, 8, 1.0, "PjitFunction")]
    gpu = [meta("process_name", 2, "/device:GPU:0 NVIDIA H200"), meta("thread_name", 2, "stream 7", tid=1)]
    assert [e[2] for e in device_events(host)] == ["fusion.1"]
    assert [e[2] for e in device_events(host + gpu)] == ["fusion.1"]  # the GPU's process is empty
    assert [e[2] for e in device_events(host + gpu + [ev(2, 1, 9.0, "gemv_1536x2048")])] == ["gemv_1536x2048"]


def test_device_seconds_times_each_job_from_a_trace():
    """Two real programs in one CPU trace: one burst each, with their kernels' busy time (finite, positive)."""
    import jax
    import jax.numpy as jnp
    from bench_common import device_seconds

    x = jnp.ones((256, 256))
    jobs = [(jax.jit(lambda a: a @ a), (x,)), (jax.jit(lambda a: jnp.tanh(a @ a) @ a), (x,))]
    out = device_seconds(jobs, runs=3)
    assert len(out) == 2
    assert all(0 < r["busy_us"] < 1e7 and r["kernels"] > 0 for r in out)


def test_small_decode_sweep_times_each_distinct_split_against_the_reference():
    """`bench.py attention --small-decode` on the CPU (interpret mode): configs that split the keys alike are timed
    once, every output is the float32 reference's, XLA is timed beside them, and the best config is named."""
    import math

    import bench_attention as ba

    from gemma4_jax.kernels import DecodeConfig

    # batch 2, one KV head, 64 slots in tiles of 16: 4 key blocks; targets 1 and 2 both give one split, 3 gives two
    configs = [DecodeConfig(16, 4, 1, tp) for tp in (1, 2, 3)]
    row = ba.sweep_small_decode("e2b sliding", 4, 1, 32, 2, 64, interpret=True, stream_bytes=1, first=configs)
    labels = [r["label"] for r in row["configs"]]
    assert labels[:4] == ["default", "xla", "bk16 ns1 (tp1)", "bk16 ns2 (tp3)"], labels
    assert len(labels) == 4 + len(ba.SMALL_DECODE_SHAPES_OF_WARPS) and len(set(labels)) == len(labels)
    for r in row["configs"]:
        assert r["rel_err"] < 2e-2, r
        assert math.isfinite(r["us"]) and r["us"] > 0, r
    assert row["best"]["label"] in labels and row["best"]["label"] != "xla"
    assert row["default_over_best"] >= 1.0


def test_small_decode_bad_names_say_so_in_one_sentence(tmp_path):
    """A shape or point `--small-decode` cannot read: one sentence, a non-zero exit, no JSON (the command line once;
    each flag's rule in process)."""
    import bench_attention as ba

    run = _run_bench(["attention", "--small-decode", "--small-decode-only", "e2b slidng", "--json",
                      str(tmp_path / "o.json")])
    assert run.returncode != 0 and "names 'e2b slidng'" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not os.path.exists(tmp_path / "o.json")
    for bad in ("64x", "x256", "0x256", "64*256"):
        with pytest.raises(SystemExit, match="takes BATCHxSLOTS"):
            ba.small_decode_plan("", bad)
    shapes, points = ba.small_decode_plan("e4b full", "1x256, 64x512")
    assert shapes == [("e4b full", 8, 2, 512)] and points == [(1, 256), (64, 512)]


def test_bench_barrier_checks_then_times_both(tmp_path):
    """`bench.py barrier` on the CPU (interpret mode): both spins and the chain give the reference at each round
    count, their times are finite and positive, and the slopes are reported; a round count below 2, one sentence."""
    import math

    res = _bench(["barrier", "--rounds", "2,3", "--iterations", "2", "--repeat", "1"], tmp_path)
    assert res["programs"] == 4 and res["interpret"] and set(res["results"]) == {"2", "3"}
    for entry in res["results"].values():
        for key in ("chain_us_per_call", "barrier_atomic_us_per_call", "barrier_volatile_us_per_call"):
            assert math.isfinite(entry[key]) and entry[key] > 0, entry
    assert set(res["us_per_barrier"]) == {"atomic", "volatile"} and math.isfinite(res["us_per_kernel_boundary"])
    run = _run_bench(["barrier", "--rounds", "1,3", "--json", str(tmp_path / "bad.json")])
    assert run.returncode != 0 and "at least 2" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not os.path.exists(tmp_path / "bad.json")


def test_output_projection_config_flag(tmp_path):
    """`--output-projection-config`: BN,BK,SPLIT[,WARPS,STAGES] becomes the skinny kernel's config; anything else is
    one sentence and a non-zero exit, with no JSON written."""
    import argparse

    import bench_generate as bg

    from gemma4_jax.kernels.gemv import GemvConfig

    assert bg.gemv_config("16,256,1") == GemvConfig(16, 256, 1)
    assert bg.gemv_config("32,128,2,8,3") == GemvConfig(32, 128, 2, 8, 3)
    for bad in ("16,100,1", "16,256", "8,256,1", "16,256,0", "a,b,c", "16,256,1,4"):
        with pytest.raises(argparse.ArgumentTypeError, match="takes BN,BK,SPLIT"):
            bg.gemv_config(bad)
    run = _run_bench(["generate", "--output-projection-config", "16,100,1", "--json", str(tmp_path / "o.json")])
    assert run.returncode != 0 and "takes BN,BK,SPLIT" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not os.path.exists(tmp_path / "o.json")


def test_trace_summary_per_step_is_the_difference_over_the_steps():
    from trace_summary import per_step

    def summary(busy, idle, span, gemm, other):
        return {"device_busy_us": busy, "idle_us": idle, "span_us": span, "kernel_count": gemm[1] + other[1],
                "classes": {"gemm": {"total_us": gemm[0], "count": gemm[1]},
                            **({"reduction": {"total_us": other[0], "count": other[1]}} if other[1] else {})}}

    step = per_step(summary(500.0, 300.0, 800.0, (400.0, 40), (100.0, 60)), summary(100.0, 20.0, 120.0, (80.0, 8),
                                                                                      (0.0, 0)), steps=4)
    assert step["busy_us"] == 100 and step["idle_us"] == 70 and step["span_us"] == 170 and step["kernels"] == 23
    assert step["classes"] == {"gemm": {"us": 80.0, "kernels": 8.0}, "reduction": {"us": 25.0, "kernels": 15.0}}


def test_trace_gaps_between_anchor_kernels():
    """The windows when no expert kernel runs: grouped by the anchors on either side, with each kernel's overlap
    with them and the covered time (a union, so overlapping kernels count once); per step as a difference."""
    from trace_summary import gaps, per_step_gaps

    ev = [(0.0, 10.0, "moe_gate_up"), (8.0, 4.0, "dense.1"), (10.0, 3.0, "x.7"), (14.0, 5.0, "moe_down"),
          (19.0, 2.0, "y"), (20.0, 4.0, "z"), (25.0, 10.0, "moe_gate_up"), (30.0, 6.0, "moe_down"),
          (37.0, 2.0, "y"), (40.0, 3.0, "moe_gate_up")]
    g = gaps(ev)  # anchors (25, 35) and (30, 36) overlap: one run from gate_up to down
    assert set(g) == {"gate_up→down", "down→gate_up"}
    assert g["gate_up→down"]["windows"] == 1 and g["gate_up→down"]["total_us"] == 4.0
    assert g["gate_up→down"]["kernels"] == {"dense": [2.0, 1], "x": [3.0, 1]}
    assert g["gate_up→down"]["busy_us"] == 3.0  # 10–13 covered, 13–14 not
    d = g["down→gate_up"]
    assert d["windows"] == 2 and d["total_us"] == 6.0 + 4.0 and d["busy_us"] == 5.0 + 2.0
    assert d["kernels"] == {"y": [4.0, 2], "z": [4.0, 1]}
    one = gaps(ev[:4])
    step = per_step_gaps(g, one, steps=2)
    assert step["down→gate_up"] == {"windows": 1.0, "us": 5.0, "covered_us": 3.5,
                                    "kernels": [{"name": "y", "us": 2.0, "count": 1.0},
                                                {"name": "z", "us": 2.0, "count": 0.5}]}
    assert step["gate_up→down"]["us"] == 0.0 and gaps([(0.0, 1.0, "gemv")]) == {}


def test_trace_summary_cli_prints_the_windows(tmp_path, capsys):
    """The command line on a (written) perfetto trace of one GPU: the kernels, then with --anchor the windows."""
    import gzip

    from trace_summary import main

    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    for ts, dur, name, pid in ((0, 10, "moe_gate_up", 1), (10, 3, "fusion.7", 1), (14, 5, "moe_down", 1),
                               (19, 4, "gemv_64x64", 1), (25, 9, "moe_gate_up", 1), (0, 50, "host_work", 2)):
        ev.append({"ph": "X", "name": name, "pid": pid, "tid": 1, "ts": ts, "dur": dur})
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    main([str(tmp_path), "--anchor", "moe"])
    out = capsys.readouterr().out
    assert "host_work" not in out and "moe_gate_up" in out
    assert "gate_up→down: 1 windows, 4.0 µs, 3.0 µs covered" in out
    assert "down→gate_up: 1 windows, 6.0 µs, 4.0 µs covered" in out and "gemv_64x64" in out


def test_bench_generate_float32(tmp_path):
    """`--dtype float32`: a float32 model (every weight), its decode timed, the roofline at 4-byte weights and cache,
    no MFU against bf16's peak; `--float32-merged` recorded (what it changes is a GPU program's: test_numerics)."""
    import math

    import bench_generate

    from gemma4_jax.config import Gemma4Config

    res = _bench(["generate", "--config", DEMO, "--batch", "1", "--prompt-len", "8", "--gen-len", "8",
                  "--prefill-len", "0", "--repeat", "1", "--hbm-gib", "0.0625", "--dtype", "float32",
                  "--float32-merged"], tmp_path)
    assert res["dtype"] == "float32" and res["float32_merged"] is True and res["weight_dtypes"] == ["float32"]
    r = res["results"]["1"]
    assert math.isfinite(r["decode_ms_per_token"]) and r["decode_ms_per_token"] > 0, r
    assert r["prefill_mfu"] is None and r["prefill_ms"] > 0, r
    cfg = Gemma4Config.from_json(DEMO)
    want = bench_generate.step_bytes(cfg, 1, 8 + 8 // 2, 4) / (res["hbm_gb_s"] * 1e9) * 1e3
    assert math.isclose(r["roofline_ms_per_token"], want, rel_tol=1e-6), (r["roofline_ms_per_token"], want)


@pytest.mark.parametrize("args,sentence", [
    (["--dtype", "float32", "--pp", "2"],
     "bench.py generate: --dtype float32 runs at --pp 1 only (the bench's pipeline is bfloat16)."),
    (["--float32-merged"],
     "bench.py generate: --float32-merged needs --dtype float32 (other dtypes are merged anyway)."),
])
def test_bench_generate_float32_flags_say_what_is_wrong(tmp_path, args, sentence):
    run = _run_bench(["generate", "--config", DEMO, "--batch", "1", *args, "--json", str(tmp_path / "o")])
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [sentence]
    assert not os.listdir(tmp_path)


def test_bench_generate_profile_hlo_without_profile_says_so(tmp_path):
    run = _run_bench(["generate", "--config", DEMO, "--batch", "1", "--profile-hlo", "--json", str(tmp_path / "o")])
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "bench.py generate: --profile-hlo needs --profile DIR (the dump goes into DIR/hlo)."]
    assert not os.listdir(tmp_path)


def test_bench_generate_unwritable_compile_cache_says_so(tmp_path):
    (tmp_path / "file").write_text("")
    run = _run_bench(["generate", "--config", DEMO, "--batch", "1", "--compile-cache", str(tmp_path / "file"),
                      "--json", str(tmp_path / "o")])
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        f"bench.py generate: --compile-cache {tmp_path / 'file'} is a file, not a directory: give a writable "
        f"directory, or 'off' for no cache."]
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_hlo_scopes_name_what_a_fusion_runs(tmp_path):
    """trace_summary.hlo_scopes on a real compiled program's optimised HLO text (as XLA's dump writes it): a fusion
    maps to the named scopes of every op inside it, layer numbers folded; the newest compile of a module wins; a
    kernel whose instance names that instruction is annotated, another is not."""
    import jax
    import jax.numpy as jnp
    from trace_summary import annotate, hlo_scopes

    def f(x):
        with jax.named_scope("layer_3"), jax.named_scope("mlp"):
            return jnp.tanh(x * 2 + 1).sum()

    text = jax.jit(f).lower(jnp.ones(8)).compile().as_text()
    (tmp_path / "module_0007.jit_f.cpu_after_optimizations.txt").write_text(text)
    (tmp_path / "module_0003.jit_f.cpu_after_optimizations.txt").write_text(text.replace("mlp", "older"))
    (tmp_path / "module_0007.jit_f.cpu_after_optimizations-buffer-assignment.txt").write_text("not HLO")
    table = hlo_scopes(str(tmp_path))["jit_f"]
    fusion = next(n for n in table if n.endswith("fusion"))
    assert {"layer_*/mlp/mul", "layer_*/mlp/add", "layer_*/mlp/tanh"} <= set(table[fusion]), table[fusion]
    assert not any("older" in s for scopes in table.values() for s in scopes)
    kernels = [{"name": "k1"}, {"name": "k2"}]
    assert annotate(kernels, {"k1": {"hlo_module": "jit_f", "hlo_op": fusion}, "k2": {"hlo_op": fusion}}, {
        "jit_f": table}) == 1
    assert kernels[0]["hlo"] == {"op": fusion, "scopes": table[fusion]} and "hlo" not in kernels[1]


def test_bench_pipeline_runs(tmp_path):
    res = _bench(["pipeline", "--config", DEMO, "--pp", "2", "--batch", "2", "--prompt-len", "8", "--gen-len", "8",
                  "--prefill-len", "40", "--repeat", "1", "--shape-control", "--f32-reference"], tmp_path, devices=2)
    pp2 = res["pp2"]
    for key in ("pp1", "pp2"):
        assert set(res[key]["by_batch"]) == {"2"} and res[key]["prefill_ms"] > 0
        assert all(r["decode_tok_s"] > 0 for r in res[key]["by_batch"].values())
    ratios = pp2["ratios_vs_pp1"]
    assert ratios["prefill"] > 0 and set(ratios["decode_throughput_by_batch"]) == {"2"}
    assert pp2["split"][0] == 0 and pp2["split"][-1] == len(json.load(open(DEMO))["layer_types"])
    assert 0.3 < pp2["ratios_vs_pp1"]["weights_per_device"] < 1.0
    assert pp2["kl_vs_pp1"]["mean"] < 1e-2  # bf16 on the CPU: the same function, a few last-bit differences
    assert 0.0 <= pp2["greedy_equal_fraction"] <= 1.0 and pp2["decode_tok_s"] > 0
    # issue #21's agreement bars: the KLs to a float32 forward of the same weights, and the shape control (pp=1 at
    # batch 1 against batch 2); on the CPU both layouts compute the same function, so their KLs to float32 agree
    kl1, kl2 = res["pp1"]["kl_vs_f32"]["mean"], pp2["kl_vs_f32"]["mean"]
    assert 0 < kl1 < 0.05 and 0 < kl2 < 0.05, (kl1, kl2)
    assert pp2["ratios_vs_pp1"]["kl_vs_f32"] == pytest.approx(kl2 / kl1)
    assert 0.5 < pp2["ratios_vs_pp1"]["kl_vs_f32"] < 2.0
    control = res["pp1"]["kl_batch1_vs_batch2"]["mean"]
    assert control >= 0 and pp2["kl_vs_pp1_over_shape_control"] == (
        pp2["kl_vs_pp1"]["mean"] / control if control > 0 else None)


def test_roofline_bytes_match_published_sizes():
    """Bytes a batch-1 decode step reads, against the published parameter counts: 31B reads all 30.7 B
    parameters; 26B-A4B only its ≈ 3.8 B active ones (8 of 128 experts per layer)."""
    from bench_generate import step_bytes

    from gemma4_jax.config import preset

    assert step_bytes(preset("31b"), 1, 0) == pytest.approx(2 * 30.7e9, rel=0.01)
    assert 2 * 3.6e9 < step_bytes(preset("26b-a4b"), 1, 0) < 2 * 4.0e9
    # At batch 16, 16 × 8 routed slots can reach all 128 experts: every expert counts.
    assert step_bytes(preset("26b-a4b"), 16, 0) == pytest.approx(2 * 25.2e9, rel=0.01)


@pytest.mark.parametrize("name", ["e2b", "e4b", "26b-a4b", "31b"])
def test_dense_bench_counts_every_decode_projection(name):
    """`bench.py dense`'s shapes × uses add up to exactly the elements of every weight product in the model's
    layers (attention, MLP, router, per-layer-input block): none missed, none counted twice."""
    import numpy as np
    from bench_dense import projection_shapes

    from gemma4_jax.config import preset
    from gemma4_jax.model.text import abstract_model, iter_params

    cfg = preset(name)
    products = {("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"), ("mlp", "gate"),
                ("mlp", "up"), ("mlp", "down"), ("moe", "router_proj"), ("ple_gate",), ("ple_proj",)}
    want = sum(int(np.prod(v.get_value().shape)) for p, v in iter_params(abstract_model(cfg))
               if p[0] == "layers" and p[2:] in products)
    assert sum(k * n * uses for (k, n), uses in projection_shapes(cfg).items()) == want


def test_numerics_bench_cuts_and_scores():
    from bench_numerics import cut_config, errors

    from gemma4_jax.config import PRESETS, Gemma4Config

    raw = cut_config(PRESETS["e2b"], 10, 8192)
    cfg = Gemma4Config.from_hf_dict(raw)
    assert cfg.num_layers == 10 and cfg.vocab_size == 8192 and cfg.ple_vocab_size == 8192
    assert 0 < cfg.num_kv_shared_layers < 10
    moe = Gemma4Config.from_hf_dict(cut_config(PRESETS["26b-a4b"], 4, 4096, experts=16))
    assert moe.num_experts == 16 and moe.top_k_experts == 8
    import numpy as np

    ref = np.array([[[1.0, -2.0, 4.0], [0.5, 3.0, -1.0]]])
    e = errors(ref, ref + np.array([[[0.0, 0.0, 0.4], [0.0, 0.0, 0.0]]]))
    assert abs(e["mean_rel"] - 0.4 / 6 / (11.5 / 6)) < 1e-12 and e["top1"] == 1.0
    assert errors(ref, ref[..., ::-1])["top1"] == 0.5


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_transformers_half_times_decode_by_its_clock_and_without_a_streamer(dtype):
    """`generate --compare transformers`' half, in this process on the demo config (eager; the CPU here): decode
    timed by the streamer's clock, and the streamer-free difference of two generation lengths beside it."""
    import argparse
    import math
    import time

    import bench_generate
    from bench_common import Progress

    parser = argparse.ArgumentParser()
    bench_generate.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["generate", "--config", DEMO, "--batch", "1", "--prompt-len", "8", "--gen-len", "5",
                              "--compare", "transformers", "--compile-batches", "", "--prefill-len", "0",
                              *(["--dtype", "float32"] if dtype == "float32" else [])])
    res: dict = {}
    bench_generate._transformers(args, res, Progress(res, None, start=time.time()))
    out = res["transformers"]
    assert out["device"] and "error" not in out, out
    assert out["dtype"] == f"torch.{dtype}"  # bf16 by default, --dtype's otherwise
    m = out["1"]["eager"]
    assert set(out["1"]) == {"eager"} and "error" not in m, m
    assert math.isfinite(m["decode_ms_per_token"]) and m["decode_ms_per_token"] > 0, m
    assert math.isfinite(m["decode_ms_per_token_without_streamer"]), m
    assert set(m["generate_s"]) == {"5", "5_without_streamer", "3_without_streamer"}, m
    assert all(t > 0 for t in m["generate_s"].values()), m
    assert math.isfinite(m["generation_overhead_s"]), m
    assert m["torch_compile"] == {"cudagraph_skips": 0, "graphs_compiled": 0, "graph_breaks": 0,
                                  "cudagraph_skip_reasons": []}, m  # eager: nothing compiled


def test_cudagraph_watch_counts_the_skips_torch_logs():
    """`CudagraphWatch` reads torch's own record of a skipped CUDA graph (the call inductor makes when it skips one),
    with its reason, and only what happened inside the block."""
    from bench_generate import CudagraphWatch
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to a skip before the watch")
    with CudagraphWatch() as watch:
        for _ in range(2):
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs")
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to a skip after the watch")
    assert watch.result() == {"cudagraph_skips": 2, "graphs_compiled": 0, "graph_breaks": 0,
                              "cudagraph_skip_reasons": ["skipping cudagraphs due to mutated inputs"]}


def test_towers_bench_scores_tiny_towers(tmp_path):
    """`bench.py towers --tiny`, in this process (no second start-up of jax, torch and transformers; the CPU here):
    both towers, ours and transformers' float32 within float32 rounding of the float64 reference, bfloat16 far
    from it (so the scoring measures something); `--blocked-sums-on-gpu` and `--key-sums-whole` are recorded and
    undone after the run; `--time` gives each tower's forward a finite, positive time in both dtypes."""
    import bench

    out = tmp_path / "towers.json"
    from gemma4_jax.kernels import numerics

    bench.main(["towers", "--tiny", "--images", "2", "--image-tokens", "70", "--audio-seconds", "1",
                "--blocked-sums-on-gpu", "--key-sums-whole", "--time", "2", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["blocked_sums"] == ["cpu", "gpu"] and numerics.BLOCKED_BACKENDS == ("cpu",)  # and restored
    assert res["key_sums_blocked"] == ["cpu"] and numerics.KEY_SUM_BACKENDS == ("cpu", "gpu")
    for tower in res["towers"].values():
        assert set(tower["ours_ms"]) == {"f32", "bf16"}
        assert all(math.isfinite(ms) and ms > 0 for ms in tower["ours_ms"].values()), tower["ours_ms"]
    assert set(res["towers"]) == {"vision", "audio"} and res["card"] and res["transformers_on"] in ("cpu", "cuda")
    for name, tower in res["towers"].items():
        runs = tower["runs"]
        assert tower["clipped_linears"] > 0 and tower["output"][1] == res["text_width"], name
        assert runs["ours_f32"]["max_rel"] <= 1e-4 and runs["transformers_f32"]["max_rel"] <= 1e-4, (name, runs)
        assert runs["ours_bf16"]["max_rel"] > 10 * runs["ours_f32"]["max_rel"], (name, runs)
        assert runs["transformers_bf16"]["max_rel"] > 10 * runs["transformers_f32"]["max_rel"], (name, runs)
        ratio = tower["ours_over_transformers"]["f32"]["max_rel"]
        assert ratio == pytest.approx(runs["ours_f32"]["max_rel"] / runs["transformers_f32"]["max_rel"])


def test_towers_bench_runs_vision_parts_in_float64(tmp_path):
    """`bench.py towers --f64-parts`: one run of ours per part with that part in float64, each a different result
    from plain float32 (the part was swapped in), and with every part in float64 ours comes closer to the float64
    reference than in plain float32 (only the parts' own float32 roundings are left). The bench turns JAX's float64
    on for its whole process, so it runs in a subprocess here."""
    import bench_towers

    out = tmp_path / "towers.json"
    run = _run_bench(["towers", "--tiny", "--towers", "vision", "--images", "1", "--image-tokens", "70",
                      "--f64-parts", ",".join(bench_towers.VISION_F64_PARTS), "--json", str(out)])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    runs = json.loads(out.read_text())["towers"]["vision"]["runs"]
    base = runs["ours_f32"]
    for part in bench_towers.VISION_F64_PARTS:
        assert runs[f"ours_f32+f64:{part}"] != base, (part, runs)
    every = runs["ours_f32+f64:" + ",".join(bench_towers.VISION_F64_PARTS)]
    assert every["max_rel"] < base["max_rel"] and every["mean_rel"] < 0.8 * base["mean_rel"], runs


@pytest.mark.parametrize("args,sentence", [
    (["--f64-parts", "attention,softmax"],
     "bench.py towers: --f64-parts softmax is not a part of the vision tower (the parts: attention, linears, norms, "
     "gelu, rope, patches, embedder)."),
    (["--towers", "audio", "--f64-parts", "norms"],
     "bench.py towers: --f64-parts names parts of the vision tower; add vision to --towers."),
    (["--time", "-1"], "bench.py towers: --time -1: a count of calls, 0 or more."),
])
def test_towers_bench_f64_parts_say_what_is_wrong(tmp_path, args, sentence):
    run = _run_bench(["towers", "--tiny", *args, "--json", str(tmp_path / "o")])
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [sentence]
    assert not os.listdir(tmp_path)


def _queue(args: list[str], tmp_path, queue: str, cwd=None):
    path = tmp_path / "queue.txt"
    path.write_text(queue)
    out = tmp_path / "queue.json"
    return _run_bench(["queue", str(path), *args, "--json", str(out)], cwd=cwd), out


def test_bench_queue_runs_each_run_in_its_own_process_into_one_file(tmp_path):
    """`bench.py queue`: every run's status, exit code and JSON in the one output file (a run that works, one that
    fails, one whose own environment makes it fail, one past its timeout, killed), `set` arguments appended to the
    runs of their subcommand; with no budget left every run is skipped without starting. The run that works keeps
    its programs in `--compile-cache DIR` (the cache's other forms: test_bench_queue_shares_one_compile_cache)."""
    queue = (f"set chain --context 32  # appended\nch chain --config {DEMO} --batch 1\n"
             "bad generate --config /no/such/config.json --batch 1\n"
             f"env JAX_PLATFORMS=nosuch chain --config {DEMO} --batch 1\n"
             f"set timeout 0.5\nslow chain --config {DEMO} --batch 1\n")
    kept = tmp_path / "kept"
    run, out = _queue(["--compile-cache", str(kept)], tmp_path, queue)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert any(name.startswith("jit_") for name in os.listdir(kept)), os.listdir(kept)
    runs = {r["name"]: r for r in json.load(open(out))["runs"]}
    assert [runs[n]["status"] for n in ("ch", "bad", "env", "slow")] == ["ok", "failed", "failed", "timeout"]
    assert runs["env"]["command"].startswith("JAX_PLATFORMS=nosuch python3 tools/bench.py chain")
    assert any("nosuch" in line for line in runs["env"]["log_tail"]) and runs["env"]["result"] is None
    assert runs["ch"]["rc"] == 0 and runs["ch"]["command"].endswith("--batch 1 --context 32")
    assert runs["ch"]["result"]["context"] == 32 and runs["ch"]["result"]["results"]["1"]["critical_path"] > 0
    assert runs["bad"]["rc"] != 0 and runs["bad"]["result"] is None
    assert any("no config.json" in line for line in runs["bad"]["log_tail"])
    assert runs["slow"]["rc"] != 0 and runs["slow"]["timeout_s"] == 0.5
    run, out = _queue(["--budget-s", "0"], tmp_path, queue)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [r["status"] for r in json.load(open(out))["runs"]] == ["skipped"] * 4


def _fake_tree(path, dumped: str):
    """A source tree at `path` whose tools/bench.py writes `dumped` (a dict expression over os and sys) as its JSON."""
    (path / "tools").mkdir(parents=True)
    (path / "tools" / "bench.py").write_text(
        f"import json, os, sys\njson.dump({dumped}, open(sys.argv[sys.argv.index('--json') + 1], 'w'))\n")
    return path


def test_bench_queue_runs_another_tree(tmp_path):
    """`set tree DIR`: later runs use DIR's tools/bench.py, from DIR, importing DIR's package; `set tree .` this
    tree's again; a tree without a bench fails its run alone."""
    old = _fake_tree(tmp_path / "old", "{'cwd': os.getcwd(), 'path': os.environ['PYTHONPATH'], 'argv': sys.argv[1:]}")
    queue = (f"set tree {old}\nold chain --batch 2\nset tree {tmp_path / 'none'}\nnone chain --batch 2\n"
             "set tree .\nnew chain --help\n")  # this tree's bench: its options, no JSON
    run, out = _queue([], tmp_path, queue)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    runs = {r["name"]: r for r in json.load(open(out))["runs"]}
    assert [runs[n]["status"] for n in ("old", "none", "new")] == ["ok", "failed", "ok"]
    assert runs["old"]["result"]["cwd"] == str(old) and runs["old"]["result"]["path"] == str(old)
    assert runs["old"]["result"]["argv"][:3] == ["chain", "--batch", "2"] and runs["old"]["tree"] == str(old)
    assert runs["old"]["command"] == f"(cd {old} && PYTHONPATH=. python3 tools/bench.py chain --batch 2)"
    assert "holds no tools/bench.py" in runs["none"]["log_tail"][0]
    assert runs["new"]["tree"] == "." and any("--decode-xla-option" in line for line in runs["new"]["log_tail"])


def test_bench_queue_runs_only_on_the_card_it_names(tmp_path):
    """`set card NAME`: later runs run only where the machine's card name holds NAME (any case; 'cpu' without a
    GPU), the others are skipped and say why; `set card any` lifts it; a queue none of whose runs can run here
    stops before the first, in one sentence, with no output file."""
    import bench_queue

    card = bench_queue.machine_card()  # 'cpu' on CI; a GPU machine's name, e.g. 'NVIDIA H100 80GB HBM3'
    assert card
    here = card.split()[-1].upper()  # a word of this card's name, in another case
    fake = _fake_tree(tmp_path / "fake", "{'ran': True}")
    queue = (f"set tree {fake}\nfree chain\nset card NO-SUCH-CARD\nother chain\nset card {here}\nhere chain\n"
             "set card any\nagain chain\n")
    run, out = _queue([], tmp_path, queue)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    runs = {r["name"]: r for r in json.load(open(out))["runs"]}
    assert [runs[n]["status"] for n in ("free", "other", "here", "again")] == ["ok", "skipped", "ok", "ok"]
    assert runs["other"]["log_tail"] == [
        f"skipped: it needs a card named like 'NO-SUCH-CARD', this machine has '{card}'"]
    assert runs["here"]["result"] == {"ran": True}
    out.unlink()
    run, out = _queue([], tmp_path, f"set tree {fake}\nset card NO-SUCH-B\na chain\nset card NO-SUCH-A\nb chain\n")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()
    says = f"runs on this machine's card ('{card}'): they need 'NO-SUCH-A' or 'NO-SUCH-B'"
    assert len(last) == 1 and says in last[0], last
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")


@pytest.mark.parametrize("queue, says", [
    ("x nosuch --a\n", "'nosuch' is not a bench.py subcommand"),
    ("a chain\na chain\n", "the run name 'a' is used twice"),
    ("a chain --json x.json\n", "drop --json"),
    ("set timeout soon\n", "the timeout must be a positive number"),
    ("# nothing\n", "the queue holds no runs"),
    ("a chain 'unclosed\n", "line 1"),
    ("a FOO=1\n", "the run 'a' names no bench.py subcommand"),
])
def test_bench_queue_bad_file_says_so_in_one_sentence(tmp_path, queue, says):
    run, out = _queue([], tmp_path, queue)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("bench.py queue: ") and says in last[0], run.stderr
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")


def test_bench_queue_shares_one_compile_cache(tmp_path):
    """The runs of a queue share JAX's persistent compilation cache: a folder of the queue's own by default (one for
    all its runs, gone at its end), `--compile-cache DIR`, or none with `off` (whatever the environment says); a
    run's own environment line decides over the flag. As the CLI's cache, it keeps every program however fast it
    compiled, and generation's programs as executables in DIR/programs. (A real run's programs in DIR:
    test_bench_queue_runs_each_run_in_its_own_process_into_one_file.)"""
    fake = _fake_tree(tmp_path / "fake", "{'cache': os.environ.get('JAX_COMPILATION_CACHE_DIR'), 'env': "
                                         "[os.environ.get(n) for n in ('GEMMA4_JAX_PROGRAM_CACHE', "
                                         "'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')]}")
    queue = f"set tree {fake}\na chain\nb chain\nown JAX_COMPILATION_CACHE_DIR=/mine chain\n"

    def caches(args, cwd=None):
        run, out = _queue(args, tmp_path, queue, cwd)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        res = json.load(open(out))
        for r in res["runs"][:2]:  # the program folder and the threshold come with the queue's cache ('off': neither)
            cache, inherited = r["result"]["cache"], os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
            assert r["result"]["env"] == ([os.path.join(cache, "programs"), "0"] if cache else [None, inherited])
        return [r["result"]["cache"] for r in res["runs"]], res["compile_cache"]

    (a, b, own), said = caches([])
    assert a == b and a.endswith("jax-cache") and own == "/mine" and said == "the queue's own"
    assert not os.path.exists(a)  # the queue's own folder goes with it
    assert caches(["--compile-cache", str(tmp_path / "kept")]) == ([str(tmp_path / "kept")] * 2 + ["/mine"],
                                                                    str(tmp_path / "kept"))
    assert caches(["--compile-cache", "off"])[0] == [None, None, "/mine"]
    # a folder named relative to where the queue starts, as the queues' `.bench-cache`: the same folder for a run in
    # another tree, whose process starts in that tree
    (tmp_path / "here").mkdir()
    assert caches(["--compile-cache", "rel"], cwd=tmp_path / "here")[0][:2] == [str(tmp_path / "here" / "rel")] * 2


def test_bench_queue_unwritable_compile_cache_says_so_in_one_sentence(tmp_path):
    (tmp_path / "file").write_text("")
    run, out = _queue(["--compile-cache", str(tmp_path / "file")], tmp_path, "a chain --help\n")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [f"bench.py queue: --compile-cache {tmp_path / 'file'} is a file, not a "
                                               f"directory: give a writable directory, or 'off' for no cache."]
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")


def test_bench_queue_missing_file(tmp_path):
    run = _run_bench(["queue", str(tmp_path / "none.txt")])
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"bench.py queue: cannot read the queue file "
                                               f"{str(tmp_path / 'none.txt')!r} (No such file or directory)."]


def test_planned_queues_parse():
    """The queue files planned for GPU calls (docs/queues/) name real subcommands and flags: each run's arguments
    parse with bench.py's own parser."""
    import bench
    import bench_queue

    parser = bench.build_parser()
    subcommands = set(parser.get_default("subcommands")) - {"queue"}
    folder = os.path.join(ROOT, "docs", "queues")
    files = sorted(os.listdir(folder))
    assert files
    for name in files:
        path = os.path.join(folder, name)
        runs = bench_queue.parse(open(path).read(), path, subcommands)
        for r in runs:
            if r.tree == ".":  # another tree's bench has its own flags
                parser.parse_args([*r.argv, "--json", "x.json"])  # exits (fails the test) on an unknown flag


def test_chain_compiles_the_step_with_the_decode_options(monkeypatch):
    """`bench.py chain` compiles the step with the decode programs' XLA options (`programs.compiler_options`): a
    value XLA refuses reaches XLA and fails the compile, naming the option."""
    import bench_chain as bc

    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.generation import programs

    monkeypatch.setattr(programs, "DECODE_XLA_OPTIONS", {"xla_gpu_enable_triton_gemm": "maybe"})
    with pytest.raises(Exception, match="xla_gpu_enable_triton_gemm"):
        bc.compile_step(Gemma4Config.from_json(DEMO), 1, 32, "auto", "device")


def test_numerics_bench_runs_our_paths_as_asked(tmp_path, monkeypatch):
    """`bench.py numerics --config … --moe-impl interpret --attn-impl xla` on the CPU, in this process, with a small
    26B-A4B-like config: our runs take the expert kernels (interpret mode) and hand attention the impl they were
    given (not the default 'auto'), the dispatcher's MoE setting is restored afterwards, and our float32 error stays
    at transformers' scale."""
    import argparse

    import bench_numerics
    from hf_fixtures import FAMILIES

    from gemma4_jax.kernels import dispatch

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(FAMILIES["26b-a4b"], architectures=["Gemma4ForCausalLM"],
                                   model_type="gemma4_text")))
    moe, asked, real_moe, real_attn, before = [], [], dispatch.resolve_moe, dispatch.resolve, dispatch.MOE_FORCE
    monkeypatch.setattr(dispatch, "resolve_moe", lambda *a, **k: moe.append(real_moe(*a, **k)) or moe[-1])
    monkeypatch.setattr(dispatch, "resolve", lambda impl, **k: asked.append(impl) or real_attn(impl, **k))
    parser = argparse.ArgumentParser()
    bench_numerics.add_parser(parser.add_subparsers())
    args = parser.parse_args(["numerics", "--config", str(cfg), "--layers", "2", "--vocab", "256", "--tokens", "12",
                              "--no-default-run", "--attn-impl", "xla", "--moe-impl", "interpret", "--per-layer",
                              "--reference", "float64", "--json", str(tmp_path / "out.json")])
    res = args.func(args)
    assert res["moe_impl"] == "interpret" and res["attn_impl"] == "xla" and dispatch.MOE_FORCE == before
    assert moe and set(moe) == {"interpret"} and asked and set(asked) == {"xla"}, (set(moe), set(asked))
    assert json.load(open(tmp_path / "out.json"))["moe_impl"] == "interpret"
    t, o = res["runs"]["transformers_f32"], res["runs"]["ours_f32"]
    assert o["top1"] == 1.0 and 0 < o["mean_rel"] < 10 * t["mean_rel"] + 1e-6, (o, t)
    # --per-layer: the stream entering each layer and the values inside it, ours and transformers' float32 against
    # float64. A tap that read another value than transformers' module gives (for its mean) an error of order 1.
    assert [e["layer"] for e in res["per_layer"]] == [0, 1]
    for e in res["per_layer"]:
        assert set(e["inside"]) == {"normed", "queries", "keys", "attention", "projected", "projected_normed",
                                    "attention_residual", "mlp", "experts"}, e
        for v in [e, *e["inside"].values()]:
            assert 0 <= v["transformers_f32"] < 1e-4 and 0 <= v["ours_f32"] < 1e-4, e
    assert res["per_layer"][1]["ours_f32"] > 0  # layer 0 ran in float32, not in float64
    # the reference's input norm ran in float64: transformers' float32 norm of the (exact) embedding differs from it
    # (transformers' own float64 run normalises in float32, to the bit as its float32 run: error 0)
    assert res["reference"] == "float64" and res["per_layer"][0]["inside"]["normed"]["transformers_f32"] > 0


def test_float64_throughout_lifts_transformers_float32_islands():
    """Inside `bench_numerics.float64_throughout`, transformers' Gemma 4 RMSNorm, RoPE and softmax compute float64
    inputs in float64 (against numpy's float64 to 1e-15, where as written they round to float32: 1e-8); float32
    inputs run as written; on leaving, transformers' and torch's own functions are back."""
    import numpy as np
    import torch
    from bench_numerics import float64_throughout
    from hf_fixtures import FAMILIES
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4 import modeling_gemma4 as m

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 64))
    w = rng.uniform(0.5, 1.5, size=64)
    norm = m.Gemma4RMSNorm(64, eps=1e-6)
    norm.weight.data = torch.as_tensor(w, dtype=torch.float32)
    want_norm = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * np.float32(w).astype(np.float64)
    rope = m.Gemma4TextRotaryEmbedding(Gemma4TextConfig(**FAMILIES["e2b"]))
    kind = rope.layer_types[0]
    inv = getattr(rope, f"{kind}_inv_freq").numpy().astype(np.float64)
    pos = np.arange(700, dtype=np.int64)[None]
    want_cos = np.cos(np.concatenate([pos[..., None] * inv] * 2, axis=-1))
    logits = rng.normal(size=(3, 7)) * 30
    want_softmax = np.exp(logits - logits.max(-1, keepdims=True))
    want_softmax /= want_softmax.sum(-1, keepdims=True)

    def errors():
        x64 = torch.as_tensor(x)
        cos, _ = rope(x64, torch.as_tensor(pos), kind)
        p = torch.nn.functional.softmax(torch.as_tensor(logits), dim=-1, dtype=torch.float32)
        return [float(np.abs(got.detach().double().numpy() - want).max() / np.abs(want).max())
                for got, want in ((norm(x64), want_norm), (cos, want_cos), (p, want_softmax))]

    before = (m.Gemma4RMSNorm.forward, m.Gemma4TextRotaryEmbedding.forward, torch.nn.functional.softmax)
    as_written = errors()
    with float64_throughout():
        exact = errors()
        f32 = norm(torch.as_tensor(x, dtype=torch.float32))  # float32 runs as written
        assert f32.dtype == torch.float32 and np.abs(f32.detach().numpy() - want_norm).max() > 1e-9
    assert all(e < 1e-14 for e in exact), exact
    assert all(e > 1e-9 for e in as_written), as_written
    assert (m.Gemma4RMSNorm.forward, m.Gemma4TextRotaryEmbedding.forward, torch.nn.functional.softmax) == before


def test_numerics_ops_measures_the_models_projections():
    """`bench.py numerics --ops` measures the projections as the model runs them (`norm_linears` itself among
    them) beside torch's as transformers runs them, each against float64, and says which kernels XLA compiled each
    product to; on the CPU our blocked float32 sums keep every product within 1.5× torch's error, and on a GPU
    every product but XLA's merged q, k, v (which `numerics.unmerged` keeps a float32 model out of there)."""
    import numpy as np
    from bench_numerics import PROJECTIONS, op_errors

    ops = op_errors()
    products = {name: r for name, r in ops.items() if "jax_kernels" in r}
    assert len(products) == 4 + len(PROJECTIONS), sorted(products)
    assert any(name.startswith("norm, then q, k, v") for name in products)
    for name, r in ops.items():
        for who in ("jax", "torch"):
            assert np.isfinite(r[who]["mean_rel"]) and 0 < r[who]["mean_rel"] < 1e-6, (name, r)
    import jax

    for name, r in products.items():
        assert r["jax_kernels"], name
        if name.startswith("q, k, v of one input") and jax.default_backend() != "cpu":
            continue  # XLA's merged product, 2.5× torch's error on an H100: a float32 model keeps them apart there
        assert r["jax"]["mean_rel"] <= 1.5 * r["torch"]["mean_rel"], (name, r)
