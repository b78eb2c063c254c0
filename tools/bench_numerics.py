"""`bench.py numerics`: how far float32 logits are from exact, ours against transformers', at a variant's real widths.

    PYTHONPATH=. python tools/bench.py numerics --preset e2b --layers 10 --vocab 8192 --tokens 768 [--json out.json]

Builds transformers' `Gemma4ForCausalLM` from the preset cut to `--layers` layers (KV-shared layers cut in
proportion; `--experts` to cut an MoE's experts) with the vocabulary shrunk to `--vocab`, random weights with every
norm, layer scalar and router scale perturbed away from 1.0, and saves it as a real HF directory. One forward over
`--tokens` random tokens, five ways:

  reference             transformers in float64 (IEEE double: on the GPU when there is one, else the CPU); its
                        code keeps its norms, RoPE and softmaxes in float32 (the float32 run shares those roundings)
                        unless `--reference float64` lifts them (`float64_throughout`)
  transformers_f32      transformers in float32 (the same device; torch's defaults: no TF32)
  ours_f32              gemma4_jax, dtype float32 (every matmul at full float32 precision)
  ours_f32_default      the same under JAX's default matmul precision (what float32 was before: TF32 on a GPU)
  ours_bf16             gemma4_jax, dtype bfloat16 (for scale)

Against the reference: mean rel. error = mean|Δ| / mean|ref| over all logits; per-token p99 = the 99th
percentile over tokens of max|Δ| (over the vocabulary) / max|ref|; top-1 agreement.

`--per-layer` adds the mean rel. error of the stream entering each layer (ours in float32, and transformers'
float32, each against the float64 run), which says in which layer our float32 starts to drift further, and of
the values inside each layer where both models have them (`INSIDE`, in the order a layer makes them: the
normalised input, the queries' and keys' projections, the attention's output, its projection, that projection
normalised, the stream after the attention block, the dense MLP's output, the routed experts' output), which says
in which part of a layer: the first value whose ratio to transformers' error jumps is where an excess enters (later
values carry what came before them).
`--attn-impl` and `--moe-impl` choose our runs' attention and routed-expert paths (float32 takes XLA for both by
default; `--moe-impl pallas`, the Triton expert kernels, multiplies float32 at IEEE precision), to tell which path
an excess enters through.
`--ops` instead measures single ops on this device at the model's shapes — float32 products (ours at full
precision: a plain matmul, layer 0's query and key projections of the 17e-17f cuts as `linear` runs them, q/k/v
of one input, and the model's `norm_linears` with its norm; torch's as transformers runs them, `F.linear` on an
[out, in] weight), tanh, exp, cos/sin of RoPE angles up to 1024 rad, x^-½, a mean of squares, softmax and the
GELU — JAX's and torch's, each against float64 numpy, with the kernels XLA compiled each product to.
"""

from __future__ import annotations

import contextlib
import json
import operator
import re
import tempfile
import time
from unittest import mock

import numpy as np
from bench_common import save_json


def add_parser(sub) -> None:
    p = sub.add_parser("numerics", help="float32 logits against a float64 transformers reference, ours vs theirs")
    p.add_argument("--preset", default="e2b")
    p.add_argument("--config", default=None, help="a config.json instead of --preset (smoke tests)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=0, help="cut an MoE's experts to this many (0: keep)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-default-run", action="store_true", help="skip ours_f32_default (saves a load)")
    p.add_argument("--per-layer", action="store_true",
                   help="also: the stream entering each layer, ours and transformers' float32 against float64")
    p.add_argument("--ops", action="store_true", help="only the per-op errors on this device (no model)")
    p.add_argument("--attn-impl", default="auto", choices=["auto", "xla", "pallas", "interpret"],
                   help="our runs' attention (gemma4_jax.load's attn_impl; default: auto, XLA for float32)")
    p.add_argument("--moe-impl", default=None, choices=["xla", "pallas", "interpret"],
                   help="our runs' routed experts (dispatch.MOE_FORCE): pallas, the Triton kernels, whose float32 "
                        "products are IEEE (default: the library's rule, XLA for float32)")
    p.add_argument("--reference", default="transformers", choices=["transformers", "float64"],
                   help="the exact run: transformers' code in float64 as it is (its norms, RoPE and softmaxes still "
                        "in float32), or float64 throughout (`float64_throughout`)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def cut_config(raw: dict, layers: int, vocab: int, experts: int = 0) -> dict:
    """An HF text config dict: `raw` cut to its first `layers` layers and a `vocab`-token vocabulary."""
    raw = dict(raw)
    total = int(raw["num_hidden_layers"])
    raw["num_hidden_layers"] = layers
    raw["layer_types"] = list(raw["layer_types"])[:layers]
    if raw.get("num_kv_shared_layers"):
        raw["num_kv_shared_layers"] = int(raw["num_kv_shared_layers"]) * layers // total
    raw["vocab_size"] = vocab
    if raw.get("vocab_size_per_layer_input"):
        raw["vocab_size_per_layer_input"] = vocab
    if experts and raw.get("num_experts"):
        raw["num_experts"] = experts
        raw["top_k_experts"] = min(int(raw["top_k_experts"]), experts)
    return raw


def errors(ref: np.ndarray, got: np.ndarray) -> dict:
    d = np.abs(got.astype(np.float64) - ref)
    per_token = d.reshape(-1, d.shape[-1]).max(-1) / np.abs(ref).max()
    return {"mean_rel": float(d.mean() / np.abs(ref).mean()), "token_p99": float(np.percentile(per_token, 99)),
            "top1": float(np.mean(ref.argmax(-1) == got.argmax(-1)))}


PROJECTIONS = {  # name: (contracted width, heads of 256) of layer-0 projections in the cuts 17e-17f measured
    "26B-A4B-like queries": (2816, 16), "26B-A4B-like keys": (2816, 8), "E2B-like queries": (1536, 8),
    "E2B-like keys": (1536, 1)}


def product_kernels(hlo: str) -> list[str]:
    """What a compiled program's products ran as: its custom calls (cuBLAS: `__cublas$gemm`, `__cublas$lt$matmul`),
    its fusions' backend kinds (`__triton_gemm`, ...) and any algorithm XLA's autotuner selected, each once."""
    found = re.findall(r'custom_call_target="([^"]+)"', hlo) + re.findall(r'"kind":"(__[A-Za-z_$]+)"', hlo)
    found += [f"algorithm {a}" for a in re.findall(r'"selected_algorithm":"?(-?\w+)', hlo)]
    found += [f"split_k {k}" for k in re.findall(r'"split_k":"?(\d+)', hlo) if k != "1"]
    return sorted(set(found))


def op_errors() -> dict:
    """Mean and max relative error of single float32 ops, JAX's (as the model runs them) and torch's, on this
    device, against float64 numpy."""
    import jax
    import jax.numpy as jnp
    import torch

    from gemma4_jax import api
    from gemma4_jax.kernels import numerics

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((768, 2816), np.float32), rng.standard_normal((2816, 2112), np.float32)
    a = (3 * rng.standard_normal((768, 1536))).astype(np.float32)
    ang = (np.arange(1024, dtype=np.float32)[:, None] * (10000.0 ** -(np.arange(128) / 128))).astype(np.float32)
    c = np.sqrt(2 / np.pi)
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    from gemma4_jax.model.text import norm_linears

    jax_matmul = numerics.matmul  # a plain product, as `linear` runs one

    def torch_linear(x, w):  # transformers' projections: nn.Linear, the weight stored [out, in]
        return torch.nn.functional.linear(x, w.T.contiguous())

    cases = {  # name: (jax fn, torch fn, float64 fn, inputs)
        "matmul 768x2816x2112": (jax_matmul, operator.matmul, operator.matmul, (x, w)),
    }
    for name, (k, heads) in PROJECTIONS.items():  # the projections as each side runs them in the model
        pa, pw = rng.standard_normal((768, k), np.float32), rng.standard_normal((k, heads * 256), np.float32)
        cases[f"{name} 768x{k}x{heads * 256}"] = (
            lambda x, w, h=heads: numerics.einsum("TD,DNH->TNH", x, w.reshape(w.shape[0], h, 256)).reshape(
                x.shape[0], -1),
            torch_linear, operator.matmul, (pa, pw))
    qkv = [rng.standard_normal((2816, n), np.float32) for n in (4096, 2048, 2048)]  # XLA merges such siblings
    cases["matmul 768x2816x8192"] = (jax_matmul, torch_linear, operator.matmul,  # q, k, v's width, as one
                                     (x, np.concatenate(qkv, -1)))
    cases["q, k, v of one input 768x2816x(4096+2048+2048)"] = (
        lambda x, *ws: jnp.concatenate([jax_matmul(x, w) for w in ws], -1),
        lambda x, *ws: torch.cat([torch_linear(x, w) for w in ws], -1),
        lambda x, *ws: np.concatenate([x @ w for w in ws], -1), (x, *qkv))
    nw = (1 + 0.1 * rng.standard_normal(2816)).astype(np.float32)
    torch_norm = Gemma4RMSNorm(2816, eps=1e-6).to(dev)  # transformers' own norm, its weight set per call

    @torch.no_grad()
    def torch_norm_linears(x, g, *ws):
        torch_norm.weight.data = g
        return torch.cat([torch_linear(torch_norm(x), w) for w in ws], -1)

    cases["norm, then q, k, v 768x2816x(4096+2048+2048)"] = (  # the model's own function, XLA's fusions and all
        lambda x, g, *ws: jnp.concatenate(norm_linears(x[None], g, 1e-6, list(ws), "xla"), -1)[0],
        torch_norm_linears,
        lambda x, g, *ws: np.concatenate([x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g @ w for w in ws],
                                         -1), (x, nw, *qkv))
    cases |= {
        "tanh": (jnp.tanh, torch.tanh, np.tanh, (a,)),
        "exp": (lambda v: jnp.exp(-jnp.abs(v)), lambda v: torch.exp(-torch.abs(v)), lambda v: np.exp(-np.abs(v)),
                (a,)),
        "cos (RoPE angles)": (jnp.cos, torch.cos, np.cos, (ang,)),
        "sin (RoPE angles)": (jnp.sin, torch.sin, np.sin, (ang,)),
        "x^-1/2": (lambda v: jnp.power(v * v + 1e-6, -0.5), lambda v: torch.pow(v * v + 1e-6, -0.5),
                   lambda v: (v * v + 1e-6) ** -0.5, (a,)),
        "mean of squares": (lambda v: jnp.mean(v * v, -1), lambda v: (v * v).mean(-1), lambda v: (v * v).mean(-1),
                            (a,)),
        "softmax": (lambda v: jax.nn.softmax(v, -1), lambda v: torch.softmax(v, -1),
                    lambda v: np.exp(v - v.max(-1, keepdims=True)) / np.exp(v - v.max(-1, keepdims=True)).sum(
                        -1, keepdims=True), (a,)),
        "gelu_tanh": (numerics.gelu_tanh, lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
                      lambda v: 0.5 * v * (1 + np.tanh(c * (v + 0.044715 * v**3))), (a,)),
    }
    out = {}
    for name, (fj, ft, fr, ins) in cases.items():
        ref = fr(*(i.astype(np.float64) for i in ins))
        with api.precision_scope("float32"):
            compiled = jax.jit(fj).lower(*ins).compile()
            got_j = np.asarray(compiled(*ins), np.float64)
        got_t = ft(*(torch.as_tensor(i, device=dev) for i in ins)).cpu().numpy().astype(np.float64)
        scale = np.abs(ref)
        out[name] = {who: {"mean_rel": float(np.abs(g - ref).mean() / scale.mean()),
                           "max_rel": float(np.abs(g - ref).max() / scale.max())}
                     for who, g in (("jax", got_j), ("torch", got_t))}
        j, t = out[name]["jax"], out[name]["torch"]
        if len(ins) > 1:  # a product: which kernels XLA compiled it to
            out[name]["jax_kernels"] = product_kernels(compiled.as_text())
        print(f"  {name:22s} jax mean {j['mean_rel']:.2e} max {j['max_rel']:.2e}   torch mean {t['mean_rel']:.2e} "
              f"max {t['max_rel']:.2e}  {' '.join(out[name].get('jax_kernels', []))}", flush=True)
    return out


def run(args) -> dict:
    import jax
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    import gemma4_jax
    from gemma4_jax import api
    from gemma4_jax.config import PRESETS
    from gemma4_jax.kernels import dispatch
    from gemma4_jax.testing.tiny import perturb_scales

    if args.ops:
        res = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "torch": torch.__version__,
               "card": jax.devices()[0].device_kind, "ops": op_errors()}
        save_json(res, args.json)
        return res
    base = json.load(open(args.config)) if args.config else PRESETS[args.preset]
    raw = cut_config(base, args.layers, args.vocab, args.experts)
    cuda = torch.cuda.is_available()
    res = {"preset": args.config or args.preset, "layers": args.layers, "vocab": args.vocab, "tokens": args.tokens,
           "experts": raw.get("num_experts", 0), "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
           "torch": torch.__version__, "card": jax.devices()[0].device_kind,
           "transformers_on": "cuda" if cuda else "cpu", "attn_impl": args.attn_impl, "moe_impl": args.moe_impl,
           "reference": args.reference,
           "runs": {}}
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    dev = "cuda" if cuda else "cpu"
    with torch.device(dev):  # built where it runs: initialising billions of weights on a host CPU takes minutes
        hf = Gemma4ForCausalLM(Gemma4TextConfig(**raw)).eval()
    hf = perturb_scales(hf, args.seed + 1)
    hf.config._attn_implementation = "eager"
    hf.config._experts_implementation = "eager"  # torch's grouped_mm has no float64
    ids = np.random.default_rng(args.seed).integers(3, args.vocab, size=(1, args.tokens))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        print(f"{res['preset']} cut to {args.layers} layers, vocab {args.vocab}, {args.tokens} tokens "
              f"({time.perf_counter() - t0:.0f} s to build)", flush=True)
        with torch.no_grad():
            tids = torch.as_tensor(ids, device=dev)
            with inside_values(hf, args.per_layer) as inside32:  # per layer {INSIDE name: value}
                out32 = hf(tids, output_hidden_states=args.per_layer)
            f32 = out32.logits.float().cpu().numpy()
            exact = float64_throughout() if args.reference == "float64" else contextlib.nullcontext()
            with inside_values(hf, args.per_layer) as inside64, exact:  # float64 holds the float32 weights
                out64 = hf.double()(tids, output_hidden_states=args.per_layer)
            ref = out64.logits.cpu().numpy()
            if args.per_layer:  # transformers' hidden_states[i] is the stream entering layer i (the last: normed)
                h32 = [h.cpu().numpy() for h in out32.hidden_states[:-1]]
                h64 = [h.cpu().numpy() for h in out64.hidden_states[:-1]]
            del out32, out64
        del hf
        if cuda:
            torch.cuda.empty_cache()
        runs = {"transformers_f32": f32}
        for name, dtype, scope in (("ours_f32", "float32", None), ("ours_f32_default", "float32", "default"),
                                   ("ours_bf16", "bfloat16", None)):
            if name == "ours_f32_default" and args.no_default_run:
                continue
            model = gemma4_jax.load(d, dtype=dtype, progress=False, attn_impl=args.attn_impl)
            keep, keep_moe = api.precision_scope, dispatch.MOE_FORCE
            if scope == "default":  # what float32 ran at before: JAX's default precision
                api.precision_scope = lambda dtype: contextlib.nullcontext()
            dispatch.MOE_FORCE = args.moe_impl or keep_moe
            try:
                runs[name] = np.asarray(model.logits(ids), np.float64)
                if args.per_layer and name == "ours_f32":
                    ours_h = layer_inputs(model, ids)
            finally:
                api.precision_scope, dispatch.MOE_FORCE = keep, keep_moe
            del model
    for name, got in runs.items():
        res["runs"][name] = errors(ref, got)
        e = res["runs"][name]
        print(f"  {name:18s} mean rel {e['mean_rel']:.2e}  per-token p99 {e['token_p99']:.2e}  "
              f"top-1 {e['top1']:.3f}", flush=True)
    t = res["runs"]["transformers_f32"]
    o = res["runs"]["ours_f32"]
    res["ours_over_transformers"] = {k: o[k] / t[k] for k in ("mean_rel", "token_p99")}
    print(f"  ours ÷ transformers (float32): mean {res['ours_over_transformers']['mean_rel']:.2f}×, "
          f"p99 {res['ours_over_transformers']['token_p99']:.2f}×  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.per_layer:
        def rel(a, r):
            return float(np.abs(np.asarray(a, np.float64) - r).mean() / np.abs(r).mean())

        res["per_layer"] = [{"layer": i, "transformers_f32": rel(h32[i], h64[i]),
                             "ours_f32": rel(ours_h[i]["input"], h64[i]),
                             "inside": {name: {"transformers_f32": rel(inside32[i][name], ref_v),
                                               "ours_f32": rel(ours_h[i][name], ref_v)}
                                        for name, ref_v in inside64[i].items()}}
                            for i in range(len(h64))]
        for e in res["per_layer"]:
            print(f"  entering layer {e['layer']:2d}: transformers {e['transformers_f32']:.2e}  ours "
                  f"{e['ours_f32']:.2e}  ({e['ours_f32'] / max(e['transformers_f32'], 1e-30):.2f}×)", flush=True)
            for name, v in e["inside"].items():
                print(f"      {name:18s}: transformers {v['transformers_f32']:.2e}  ours {v['ours_f32']:.2e}  "
                      f"({v['ours_f32'] / max(v['transformers_f32'], 1e-30):.2f}×)", flush=True)
    save_json(res, args.json)
    return res


# The values inside a layer that both models have, by our tap's name: transformers' module, and whether the value is
# that module's input (a pre-hook) or its output.
INSIDE = {"normed": ("input_layernorm", "output"), "queries": ("self_attn.q_proj", "output"),
          "keys": ("self_attn.k_proj", "output"), "attention": ("self_attn.o_proj", "input"),
          "projected": ("self_attn.o_proj", "output"), "projected_normed": ("post_attention_layernorm", "output"),
          "attention_residual": ("pre_feedforward_layernorm", "input"), "mlp": ("mlp", "output"),
          "experts": ("experts", "output")}


@contextlib.contextmanager
def inside_values(hf, on: bool = True):
    """While open (and `on`), hooks on transformers' decoder layers put each layer's `INSIDE` values into the list
    it yields (a dict a layer, numpy arrays a row a token, [B·T, …]; a layer without experts has no "experts")."""
    into, handles = [], []
    for i, layer in enumerate(hf.model.layers if on else ()):
        into.append({})
        for name, (module, where) in INSIDE.items():
            try:
                mod = operator.attrgetter(module)(layer)
            except AttributeError:  # `experts` only where the layer has them
                continue

            def keep(value, i=i, name=name):
                v = value[0] if isinstance(value, tuple) else value
                into[i][name] = v.detach().cpu().numpy().reshape(-1, v.shape[-1])

            if where == "input":
                handles.append(mod.register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
            else:
                handles.append(mod.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
    try:
        yield into
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def float64_throughout():
    """While open, transformers' Gemma 4 text model run in float64 stays in float64 where its code casts to float32:
    every RMSNorm, the RoPE angles and their cos/sin (the inverse frequencies keep their float32 values, the model's
    own), and the softmaxes of attention and the router. Without it a float64 run shares those float32 roundings with
    transformers' float32 run, so the reference is not exact and transformers' float32 error leaves out its own
    roundings there (the shared ones), while every other implementation's counts. Other dtypes run unchanged."""
    import torch
    from transformers.models.gemma4 import modeling_gemma4 as m

    norm, rope, softmax = m.Gemma4RMSNorm.forward, m.Gemma4TextRotaryEmbedding.forward, torch.nn.functional.softmax
    f64 = torch.float64

    def norm64(self, x):
        if x.dtype != f64:
            return norm(self, x)
        eps = self.eps if hasattr(self, "eps") else self.variance_epsilon  # transformers 5.17 names it eps
        y = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
        return y * self.weight.to(f64) if self.with_scale else y

    def rope64(self, x, position_ids, layer_type):
        if x.dtype != f64:
            return rope(self, x, position_ids, layer_type)
        inv = getattr(self, f"{layer_type}_inv_freq").to(device=x.device, dtype=f64)
        angles = position_ids[..., None].to(f64) * inv
        emb = torch.cat((angles, angles), dim=-1)
        scaling = getattr(self, f"{layer_type}_attention_scaling")
        return emb.cos() * scaling, emb.sin() * scaling

    def softmax64(x, *args, dtype=None, **kw):
        return softmax(x, *args, dtype=f64 if x.dtype == f64 else dtype, **kw)

    with (mock.patch.object(m.Gemma4RMSNorm, "forward", norm64),
          mock.patch.object(m.Gemma4TextRotaryEmbedding, "forward", rope64),
          mock.patch.object(torch.nn.functional, "softmax", softmax64)):
        yield


def layer_inputs(model, ids) -> list[dict[str, np.ndarray]]:
    """What each layer of a float32 forward taps (the model's own attention path), as `model.logits` runs it: the
    stream entering it ("input", [B,T,D]) and the `INSIDE` values, each a row a token ([B·T, …], as transformers'
    hooks keep them)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gemma4_jax import api
    from gemma4_jax.model.text import FullAttender

    graphdef, state = nnx.split(model.module)

    @jax.jit
    def forward(state, ids_bt):  # the weights as an argument: closed over, they would be constants to fold
        pos = jnp.broadcast_to(jnp.arange(ids_bt.shape[1], dtype=jnp.int32), ids_bt.shape)
        taps = []
        nnx.merge(graphdef, state).decode_layers(ids_bt, pos, FullAttender(pos, impl=model.run.attn_impl), taps=taps)
        return taps

    with api.precision_scope("float32"):
        taps = forward(state, jnp.asarray(ids))
    return [{name: np.asarray(v) if name == "input" else np.asarray(v).reshape(np.size(ids), -1)
             for name, v in t.items()} for t in taps]
