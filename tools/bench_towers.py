"""`bench.py towers`: the vision and audio towers at a variant's real widths, ours against transformers, in float32
and bfloat16, each scored against a float64 transformers reference.

    PYTHONPATH=. python tools/bench.py towers --preset e2b [--towers vision,audio] [--vision-layers N]
        [--audio-layers N] [--images 3] [--image-tokens 280] [--audio-seconds 8] [--json out.json]

Builds transformers' `Gemma4ForConditionalGeneration` with the preset's real vision tower (E2B/E4B: 768 wide, 16
layers, clipped linears; 26B/31B: 1152 wide, 27 layers, standardised) and audio tower (E2B/E4B: the 1024-wide,
12-layer conformer), `embed_vision`/`embed_audio` out to the variant's real text width, and a one-layer text model
that is never run. Random weights with every norm, position table and std buffer perturbed away from its init;
clipped linears get finite bounds at the 1st/99th percentiles of what each linear sees (so every clamp bites on
≈ 2 % of its values). `--tiny` swaps in test-sized towers (CPU smoke tests). Inputs: `--images` synthetic images
through transformers' image processor at `--image-tokens` soft tokens each (280: the default budget), and two
synthetic clips (`--audio-seconds` and 60 % of it, so the batch carries padding) through its audio feature
extractor. Each tower's soft tokens (what `Gemma4Model.forward` scatters into the text) five ways:

  reference             transformers in float64 (IEEE double on the same device; its `.float()` and
                        `softmax(dtype=float32)` upcasts, in RMSNorm, audio attention and vision pooling, are
                        kept in float64 for this run, so that no activation is rounded to float32 on the way)
  transformers_f32      transformers in float32 (TF32 off for matmuls and cuDNN convolutions)
  transformers_bf16     transformers in bfloat16 (the float32 weights saved and loaded with dtype=bfloat16)
  ours_f32              gemma4_jax in float32, under `api.precision_scope("float32")` (full-precision matmuls)
  ours_bf16             gemma4_jax in bfloat16

Against the reference: max rel = max|Δ| / max|ref| and mean rel = mean|Δ| / mean|ref| over the soft tokens
(valid audio frames only); then ours ÷ transformers for each metric, in float32 and in bfloat16.

`--f64-parts attention,linears,...` (the vision tower; JAX runs with float64 enabled) adds one run of ours in
float32 per named part with that part computed in float64 (its inputs cast up, its result rounded back to float32),
and one with all the named parts so: whichever part's float64 run drops ours' error the most is where our excess
over transformers' float32 enters. Parts: VISION_F64_PARTS.

`--blocked-sums-on-gpu` sums ours' long float32 contractions in blocks of 128 on a GPU too (`numerics.contract`, as
on the CPU; the towers' programs only), to say whether the GPU's own GEMM sums are what carries ours' excess there.
`--key-sums-whole` leaves the vision attention's sum over keys whole on a GPU (`numerics.KEY_SUM_BACKENDS` without
"gpu"), as before 2026-12-07: the error and the time that blocking it changes.

`--time N` also times ours' forward (float32 and bfloat16, the compiled call N times after a first one, the median
wall time in ms with the result on the device), to put a numerics change's cost beside its error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import numpy as np
from bench_common import save_json, seconds_per_call, torch_full_float32

# The real towers (docs/architecture.md §1 and §5; the published config.json's `vision_config` / `audio_config`).
VISION_SMALL = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                    num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
                    position_embedding_size=10240, use_clipped_linears=True, standardize=False)
VISION_LARGE = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
                    position_embedding_size=10240, use_clipped_linears=False, standardize=True)
AUDIO = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, subsampling_conv_channels=[128, 32],
             conv_kernel_size=5, attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
             attention_logit_cap=50.0, residual_weight=0.5, use_clipped_linears=True, gradient_clipping=1e10,
             rms_norm_eps=1e-6, hidden_act="silu", output_proj_dims=1536)
TOWERS = {"e2b": {"vision": VISION_SMALL, "audio": AUDIO}, "e4b": {"vision": VISION_SMALL, "audio": AUDIO},
          "26b-a4b": {"vision": VISION_LARGE}, "31b": {"vision": VISION_LARGE}}
# --tiny: test-sized towers with every feature on (clipped linears, standardisation, GQA). The audio tower keeps
# 128 input channels so that the real feature extractor's 128 mel bins fit it.
TINY = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3,
                       position_embedding_size=128, use_clipped_linears=True, standardize=True),
        "audio": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 8],
                      attention_chunk_size=4, attention_context_left=5, attention_context_right=0,
                      use_clipped_linears=True, output_proj_dims=40)}
TINY_TEXT_WIDTH = 48
# (height, width) of the synthetic images, in order; the processor resizes each to the soft-token budget.
IMAGE_SIZES = [(480, 640), (300, 1100), (900, 700), (256, 256), (1024, 512), (200, 320)]
RUNS = ("transformers_f32", "ours_f32", "transformers_bf16", "ours_bf16")
# `--f64-parts`: the vision tower's parts that can run in float64 inside a float32 run (`vision_parts_in_float64`).
VISION_F64_PARTS = ("attention", "linears", "norms", "gelu", "rope", "patches", "embedder")


def add_parser(sub) -> None:
    p = sub.add_parser("towers", help="vision/audio towers at real widths against a float64 transformers reference")
    p.add_argument("--preset", default="e2b", choices=sorted(TOWERS))
    p.add_argument("--towers", default="vision,audio", help="comma-separated; a preset's missing tower is skipped")
    p.add_argument("--vision-layers", type=int, default=0, help="cut the vision tower to this many layers (0: all)")
    p.add_argument("--audio-layers", type=int, default=0, help="cut the audio tower to this many layers (0: all)")
    p.add_argument("--images", type=int, default=3, help=f"synthetic images (at most {len(IMAGE_SIZES)})")
    p.add_argument("--image-tokens", type=int, default=280, help="soft-token budget per image (70/140/280/560/1120)")
    p.add_argument("--audio-seconds", type=float, default=8.0, help="the longer clip; the other is 60 %% of it")
    p.add_argument("--tiny", action="store_true", help="test-sized towers and text width (CPU smoke tests)")
    p.add_argument("--f64-parts", default="",
                   help="vision only: comma-separated parts of ours to rerun in float64, one run each and one with all "
                        f"({', '.join(VISION_F64_PARTS)}), to say where our float32 error enters")
    p.add_argument("--blocked-sums-on-gpu", action="store_true",
                   help="ours' float32 contractions summed in blocks on a GPU too, as on the CPU (numerics.contract)")
    p.add_argument("--key-sums-whole", action="store_true",
                   help="the vision attention's float32 sum over keys whole on a GPU (numerics.KEY_SUM_BACKENDS), "
                        "as before it was blocked there")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="time ours' forward N times (float32 and bfloat16; median ms after a first call)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def errors(ref: np.ndarray, got: np.ndarray) -> dict:
    d = np.abs(np.asarray(got, np.float64) - ref)
    return {"max_rel": float(d.max() / np.abs(ref).max()), "mean_rel": float(d.mean() / np.abs(ref).mean())}


@contextlib.contextmanager
def float64_throughout(torch):
    """transformers' Gemma 4 upcasts with `.float()` and `softmax(..., dtype=torch.float32)` (RMSNorm, audio
    attention, vision pooling and standardisation, RoPE angles): meant for 16-bit runs, these would drop a float64
    model to float32 there. Within this, `.float()` gives float64 and such softmaxes run in float64."""
    F = torch.nn.functional
    tensor_float, softmax = torch.Tensor.float, F.softmax

    def softmax64(*a, **k):
        if k.get("dtype") is torch.float32:
            k["dtype"] = torch.float64
        return softmax(*a, **k)

    torch.Tensor.float = lambda self, *a, **k: self.double(*a, **k)
    F.softmax = softmax64
    try:
        yield
    finally:
        torch.Tensor.float, F.softmax = tensor_float, softmax


@contextlib.contextmanager
def vision_parts_in_float64(parts):
    """Within this, the named parts of `gemma4_jax.model.vision` run the model's own code on float64 inputs (and
    float64 views of their weights) and round their result back to the input's dtype (JAX's float64 must be on).
    Compiled programs are dropped on entry and exit, so each run traces the model as patched."""
    import jax
    import jax.numpy as jnp

    from gemma4_jax.model import vision as V

    f64 = jnp.float64

    def up(a):  # float arrays to float64; masks, eps and None as they are
        return a.astype(f64) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a

    def wide(fn):  # fn on float64 copies of its float arguments, the result in the first one's dtype
        return lambda x, *rest: fn(up(x), *map(up, rest)).astype(x.dtype)

    class Float64Weight:  # what a module's `w[...]` gives inside its float64 call
        def __init__(self, w):
            self.w = w

        def __getitem__(self, index):
            return self.w[index].astype(f64)

    def method(fn, weights):  # a module's method with the named weights (and its dtype) seen in float64
        def call(self, x, *rest):
            saved = {name: getattr(self, name) for name in (*weights, "dtype") if hasattr(self, name)}
            for name in weights:
                setattr(self, name, Float64Weight(saved[name]))
            if "dtype" in saved:
                self.dtype = jnp.dtype(f64)
            try:
                return fn(self, up(x), *map(up, rest)).astype(x.dtype)
            finally:
                for name, value in saved.items():
                    setattr(self, name, value)
        return call

    where = {"attention": (V, "bidirectional_attention", wide(V.bidirectional_attention)),
             "linears": (V.ClippedLinear, "__call__", method(V.ClippedLinear.__call__, ("w",))),
             "norms": (V, "rms_norm", wide(V.rms_norm)), "gelu": (V, "gelu", wide(V.gelu)),
             "rope": (V, "apply_rope_2d", wide(V.apply_rope_2d)),
             "patches": (V.VisionTower, "embed_patches",
                         method(V.VisionTower.embed_patches, ("patch_proj", "pos_table"))),
             "embedder": (V.MultimodalEmbedder, "__call__", method(V.MultimodalEmbedder.__call__, ("proj",)))}
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in (where[p] for p in parts)]
    jax.clear_caches()
    try:
        for p in parts:
            owner, name, fn = where[p]
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        jax.clear_caches()


def build(torch, tower: str, tower_cfg: dict, text_width: int, seed: int, dev: str):
    """A float32 Gemma4ForConditionalGeneration on `dev` holding `tower` only, with perturbed norms, position
    table and std buffers (clip bounds are set later, by `calibrate_clips`)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = dict(vocab_size=64, hidden_size=text_width, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                hidden_size_per_layer_input=0, layer_types=["full_attention"])
    towers = {"vision_config": None, "audio_config": None, f"{tower}_config": tower_cfg}
    torch.manual_seed(seed)
    with torch.device(dev):  # built where it runs
        model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, **towers)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    rand = lambda t, scale: (scale * torch.randn(t.shape, generator=g)).to(t.device)  # noqa: E731
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not name.startswith((f"model.{tower}_tower.", f"model.embed_{tower}.")):
                continue
            if name.endswith("norm.weight") or "position_embedding" in name or name.endswith("std_scale"):
                t.copy_(1.0 + rand(t, 0.1))
            elif name.endswith(("std_bias", "per_dim_scale", "output_proj.bias")):
                t.copy_(rand(t, 0.3))
    return model


def calibrate_clips(torch, model, forward, sample: int = 1 << 20) -> int:
    """Set every clipped linear's bounds to the 1st/99th percentiles of its input and output in one float32 pass
    with open bounds (bounds that bite, at any width). Returns how many linears were clipped."""
    clipped = [m for m in model.modules() if getattr(m, "use_clipped_linears", False) and hasattr(m, "input_min")]
    stats, hooks = {}, []
    q = torch.tensor([0.01, 0.99])

    def quantiles(x):
        x = x.detach().flatten().float()
        if x.numel() > sample:
            x = x[torch.randint(0, x.numel(), (sample,), device=x.device)]
        return torch.quantile(x, q.to(x.device)).tolist()

    for m in clipped:
        hooks.append(m.linear.register_forward_hook(
            lambda mod, inp, out, m=m: stats.__setitem__(m, (quantiles(inp[0]), quantiles(out)))))
    try:
        with torch.no_grad():
            forward(model)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for m, ((in_lo, in_hi), (out_lo, out_hi)) in stats.items():
            m.input_min.fill_(in_lo), m.input_max.fill_(in_hi), m.output_min.fill_(out_lo), m.output_max.fill_(out_hi)
    return len(stats)


def images(n: int, budget: int):
    try:
        from transformers.models.gemma4 import Gemma4ImageProcessorPil as Processor
    except ImportError:  # older transformers: one processor class
        from transformers.models.gemma4 import Gemma4ImageProcessor as Processor

    rng = np.random.default_rng(0)
    sizes = IMAGE_SIZES[:n]
    # Smooth colour ramps with noise on top: pixel statistics nearer a photograph's than uniform noise.
    imgs = []
    for h, w in sizes:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([127 + 100 * np.sin(x / (17 + 5 * c) + y / (29 + 3 * c) + c) for c in range(3)], -1)
        imgs.append(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))
    out = Processor(max_soft_tokens=budget)(imgs, return_tensors="np")
    return (sizes, np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_position_ids"], np.int64),
            [int(n) for n in out["num_soft_tokens_per_image"]])


def audio_clips(seconds: float):
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor

    sr = 16_000
    rng = np.random.default_rng(1)
    clips = []
    for length in (seconds, 0.6 * seconds):
        t = np.arange(int(length * sr)) / sr
        wav = 0.3 * np.sin(2 * np.pi * (220 + 150 * t) * t) + 0.1 * np.sin(2 * np.pi * 1250 * t)
        clips.append((wav + rng.normal(0, 0.03, t.shape)).astype(np.float32))
    out = Gemma4AudioFeatureExtractor()(clips)
    feats = np.asarray(np.stack(out["input_features"]), np.float32)
    mask = np.asarray(np.stack(out["input_features_mask"]), bool)
    return [len(c) / sr for c in clips], feats, mask


def run_tower(tower: str, tower_cfg: dict, text_width: int, args, dev: str) -> dict:
    import jax.numpy as jnp
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_jax.api import precision_scope

    t0 = time.perf_counter()
    hf = build(torch, tower, tower_cfg, text_width, args.seed, dev)
    if tower == "vision":
        from gemma4_jax.model.vision import VisionConfig, image_features, load_vision

        sizes, pv, pos, per_image = images(args.images, args.image_tokens)
        inputs = {"images": [list(s) for s in sizes], "soft_tokens": per_image, "pixel_values": list(pv.shape),
                  "padding_patches": int(np.all(pos == -1, -1).sum())}
        tpv, tpos = torch.from_numpy(pv).to(dev), torch.from_numpy(pos).to(dev)

        def hf_out(m):
            return torch.cat(m.model.get_image_features(tpv, tpos).pooler_output), None

        cfg = VisionConfig.from_hf(hf.config.to_dict())

        def ours_call(dtype):  # the forward on a loaded model: its result on the device, and what is valid
            model = load_vision(state, cfg, dtype)
            # The token count from the processor, as `multimodal.Towers.image_features` passes it.
            return lambda: (image_features(model, pv, pos, sum(per_image)), None)
    else:
        from gemma4_jax.model.audio import AudioConfig, audio_features, load_audio

        seconds, feats, mask = audio_clips(args.audio_seconds)
        inputs = {"clip_seconds": seconds, "input_features": list(feats.shape), "valid_frames": mask.sum(-1).tolist()}
        tfeats, tmask = torch.from_numpy(feats).to(dev), torch.from_numpy(mask).to(dev)

        def hf_out(m):
            out = m.model.get_audio_features(tfeats, tmask, return_dict=True)
            return out.pooler_output, out.attention_mask

        cfg = AudioConfig.from_hf(hf.config.to_dict())

        def ours_call(dtype):
            model = load_audio(cfg, state, dtype)
            return lambda: audio_features(model, feats, mask)

    def ours_out(dtype):
        call = ours_call(dtype)
        with precision_scope(jnp.dtype(dtype).name):
            got, valid = call()
            return np.asarray(got, np.float64), None if valid is None else np.asarray(valid)

    def hf_run(m):
        with torch.no_grad():
            out, valid = hf_out(m)
            return out.detach().to("cpu", torch.float64).numpy(), None if valid is None else valid.cpu().numpy()

    n_clipped = calibrate_clips(torch, hf, hf_out) if tower_cfg.get("use_clipped_linears") else 0
    prefix = (f"model.{tower}_tower.", f"model.embed_{tower}.")
    state = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in hf.state_dict().items() if k.startswith(prefix)}
    params = sum(v.size for k, v in state.items() if not k.endswith(("_min", "_max")))
    outs = {}
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        outs["transformers_f32"], _ = hf_run(hf)
        with float64_throughout(torch):
            ref, ref_valid = hf_run(hf.double())  # float64 weights hold the float32 ones exactly
        del hf
        empty_cache(torch)
        # Loaded as a bf16 checkpoint is: `.to(torch.bfloat16)` would also round buffers that a load computes
        # afresh (the vision RoPE frequencies stay float32; the audio timescales are computed in bf16).
        hf = Gemma4ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).to(dev).eval()
    outs["transformers_bf16"], _ = hf_run(hf)
    del hf
    empty_cache(torch)
    for name, dtype in (("ours_f32", jnp.float32), ("ours_bf16", jnp.bfloat16)):
        outs[name], ours_valid = ours_out(dtype)
        if ref_valid is not None:  # audio: the same frames valid, scored on those only
            if not np.array_equal(ours_valid, ref_valid):
                raise AssertionError(f"{tower}: our valid-frame mask differs from transformers'")
            outs[name] = outs[name][ours_valid]
    if ref_valid is not None:
        ref = ref[ref_valid]
        outs["transformers_f32"] = outs["transformers_f32"][ref_valid]
        outs["transformers_bf16"] = outs["transformers_bf16"][ref_valid]
    for name, got in outs.items():
        if got.shape != ref.shape:
            raise AssertionError(f"{tower} {name}: shape {got.shape}, reference {ref.shape}")
    runs = {name: errors(ref, outs[name]) for name in RUNS}
    ratio = {bits: {k: runs[f"ours_{bits}"][k] / runs[f"transformers_{bits}"][k] for k in ("max_rel", "mean_rel")}
             for bits in ("f32", "bf16")}
    parts = f64_parts(args) if tower == "vision" else []
    for group in [[p] for p in parts] + ([parts] if len(parts) > 1 else []):
        with vision_parts_in_float64(group):
            runs["ours_f32+f64:" + ",".join(group)] = errors(ref, ours_out(jnp.float32)[0])
    out = {"config": tower_cfg, "layers": tower_cfg["num_hidden_layers"], "params": int(params),
           "clipped_linears": n_clipped, "text_width": text_width, "inputs": inputs, "output": list(ref.shape),
           "runs": runs, "ours_over_transformers": ratio}
    if getattr(args, "time", 0):
        out["ours_ms"] = {bits: time_call(ours_call(dtype), jnp.dtype(dtype).name, args.time)
                          for bits, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16))}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def time_call(call, precision: str, n: int) -> float:
    """The median wall time in ms of `call()` (its result on the device) over n calls after a first one."""
    from gemma4_jax.api import precision_scope

    with precision_scope(precision):
        return round(1e3 * seconds_per_call(call, repeat=n), 3)


def empty_cache(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(tower: str, r: dict) -> None:
    c = r["config"]
    print(f"{tower}: {c['hidden_size']} wide, {r['layers']} layers, {r['params'] / 1e6:.1f} M parameters, "
          f"{r['clipped_linears']} clipped linears; inputs {r['inputs']}; soft tokens {r['output']} "
          f"({r['seconds']:.0f} s)", flush=True)
    width = max(map(len, r["runs"]))
    print(f"  {'run':{width}s} {'max|Δ|/max|ref|':>16s} {'mean|Δ|/mean|ref|':>18s}", flush=True)
    for name, e in r["runs"].items():
        print(f"  {name:{width}s} {e['max_rel']:16.2e} {e['mean_rel']:18.2e}", flush=True)
    for bits, q in r["ours_over_transformers"].items():
        print(f"  ours ÷ transformers ({bits}): max {q['max_rel']:.2f}×, mean {q['mean_rel']:.2f}×", flush=True)
    for bits, ms in r.get("ours_ms", {}).items():
        print(f"  ours' forward ({bits}): {ms:.3f} ms (median)", flush=True)


def run(args) -> dict:
    if not 1 <= args.images <= len(IMAGE_SIZES):
        raise SystemExit(f"--images must be 1..{len(IMAGE_SIZES)}")
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    if not towers or not set(towers) <= {"vision", "audio"}:
        raise SystemExit(f"--towers {args.towers!r}: vision, audio or both")
    if f64_parts(args) and "vision" not in towers:
        raise SystemExit("bench.py towers: --f64-parts names parts of the vision tower; add vision to --towers.")
    # Torch shares the GPU, so JAX allocates as it goes (restored afterwards, for callers in the same process).
    env = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = env or "false"
    from gemma4_jax.kernels import numerics

    if getattr(args, "time", 0) < 0:
        raise SystemExit(f"bench.py towers: --time {args.time}: a count of calls, 0 or more.")
    blocked, key_sums = numerics.BLOCKED_BACKENDS, numerics.KEY_SUM_BACKENDS
    if getattr(args, "blocked_sums_on_gpu", False):
        numerics.BLOCKED_BACKENDS = ("cpu", "gpu")
    if getattr(args, "key_sums_whole", False):
        numerics.KEY_SUM_BACKENDS = tuple(b for b in key_sums if b != "gpu")
    try:
        with torch_full_float32():
            return _run(args, towers)
    finally:
        numerics.BLOCKED_BACKENDS, numerics.KEY_SUM_BACKENDS = blocked, key_sums
        if env is None:
            os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)


def f64_parts(args) -> list[str]:
    parts = [p.strip() for p in getattr(args, "f64_parts", "").split(",") if p.strip()]
    unknown = sorted(set(parts) - set(VISION_F64_PARTS))
    if unknown:
        raise SystemExit(f"bench.py towers: --f64-parts {','.join(unknown)} is not a part of the vision tower "
                         f"(the parts: {', '.join(VISION_F64_PARTS)}).")
    return parts


def _run(args, names: list[str]) -> dict:
    import jax
    import torch
    import transformers

    if f64_parts(args):
        jax.config.update("jax_enable_x64", True)  # before any array: the float64 parts need it

    from gemma4_jax.config import PRESETS
    from gemma4_jax.kernels import numerics

    transformers.utils.logging.disable_progress_bar()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    towers = TINY if args.tiny else TOWERS[args.preset]
    text_width = TINY_TEXT_WIDTH if args.tiny else int(PRESETS[args.preset]["hidden_size"])
    res = {"preset": args.preset + (" (tiny)" if args.tiny else ""), "date": time.strftime("%Y-%m-%d"),
           "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "card": jax.devices()[0].device_kind, "transformers_on": dev, "torch_tf32": False,
           "blocked_sums": list(numerics.BLOCKED_BACKENDS), "key_sums_blocked": list(numerics.KEY_SUM_BACKENDS),
           "text_width": text_width, "towers": {}}
    t0 = time.perf_counter()
    for tower in names:
        if tower not in towers:
            print(f"{args.preset} has no {tower} tower: skipped", flush=True)
            continue
        cfg = dict(towers[tower])
        cut = args.vision_layers if tower == "vision" else args.audio_layers
        if cut:
            cfg["num_hidden_layers"] = min(cut, cfg["num_hidden_layers"])
        res["towers"][tower] = run_tower(tower, cfg, text_width, args, dev)
        report(tower, res["towers"][tower])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(res, args.json)
    return res
