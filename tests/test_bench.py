"""The benchmark tools run end to end on the CPU (the demo model's config), and their roofline arithmetic."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "gemma4_jax", "demo_model", "config.json")
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _bench(args: list[str], tmp_path, devices: int = 1) -> dict:
    out = str(tmp_path / "out.json")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *args, "--json", out],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_bench_generate_runs(tmp_path):
    res = _bench(["generate", "--config", DEMO, "--batch", "1,2", "--prompt-len", "8", "--gen-len", "8",
                  "--prefill-len", "16", "--repeat", "1", "--hbm-gib", "0.0625", "--profile", str(tmp_path / "prof")],
                 tmp_path)
    assert res["hbm_gb_s"] > 0 and res["hbm_read_gb_s"] > 0
    for b in ("1", "2"):
        r = res["results"][b]
        assert r["decode_tokens_s"] * r["decode_ms_per_token"] / 1e3 == pytest.approx(int(b))
        assert r["roofline_ms_per_token"] > 0 and r["prefill_ms"] > 0 and r["compile_s"] > -1
    assert res["long_prefill"]["ms"] > 0 and res["long_prefill"]["tokens"] == 16
    kernels = res["profile"]["kernels"]  # tools/trace_summary.py read the trace
    assert kernels and sum(k["share"] for k in kernels) <= 1.0 + 1e-9 and all(k["count"] > 0 for k in kernels)


def test_bench_pipeline_runs(tmp_path):
    res = _bench(["pipeline", "--config", DEMO, "--pp", "2", "--batch", "2", "--prompt-len", "8", "--gen-len", "8",
                  "--repeat", "1"], tmp_path, devices=2)
    pp2 = res["pp2"]
    assert pp2["split"][0] == 0 and pp2["split"][-1] == len(json.load(open(DEMO))["layer_types"])
    assert 0.3 < pp2["ratios_vs_pp1"]["weights_per_device"] < 1.0
    assert pp2["kl_vs_pp1"]["mean"] < 1e-2  # bf16 on the CPU: the same function, a few last-bit differences
    assert 0.0 <= pp2["greedy_equal_fraction"] <= 1.0 and pp2["decode_tok_s"] > 0


def test_roofline_bytes_match_published_sizes():
    """Bytes a batch-1 decode step reads, against the published parameter counts: 31B reads all 30.7 B
    parameters; 26B-A4B only its ≈ 3.8 B active ones (8 of 128 experts per layer)."""
    from bench_generate import step_bytes

    from gemma4_jax.config import preset

    assert step_bytes(preset("31b"), 1, 0) == pytest.approx(2 * 30.7e9, rel=0.01)
    assert 2 * 3.6e9 < step_bytes(preset("26b-a4b"), 1, 0) < 2 * 4.0e9
    # At batch 16, 16 × 8 routed slots can reach all 128 experts: every expert counts.
    assert step_bytes(preset("26b-a4b"), 16, 0) == pytest.approx(2 * 25.2e9, rel=0.01)
