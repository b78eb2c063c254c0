"""The notebook/script entry point: `gemma4_jax.load(...)` and the `Gemma4Model` it returns.

Owns the run options (dtype default per platform, pp, max length), turning a checkpoint directory
into a ready model, and the jitted whole-model functions behind `.logits`. The model's params are
split from the NNX module once and passed into every compiled call as arguments.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint
from .chat import split_thoughts
from .checkpoint import staged as sc
from .checkpoint.hf import model_from_params, read_hf_params
from .config import Gemma4Config
from .demo import demo_path
from .errors import ConfigError
from .generation.loop import generate_tokens
from .generation.options import check_count, check_sampling
from .kernels.dispatch import IMPLS
from .model.text import Gemma4Text, merge, split
from .multimodal import towers as mmod
from .multimodal.towers import Towers
from .parallel.pipeline import Pipeline
from .parallel.stages import best_stages, parse_layer_split, split_params, stage_leaf_shapes, stages_from_bounds
from .tokenizer import Tokenizer, stop_ids

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class RunConfig:
    """How a model runs (separate from what the model is)."""

    dtype: str = "float32"
    pp: int = 1
    max_seq_len: int | None = None
    attn_impl: str = "auto"  # 'auto' | 'xla' | 'cudnn' | 'pallas' | 'interpret' (gemma4_jax.kernels.dispatch)


def default_dtype() -> str:
    """bfloat16 on accelerators, float32 on the CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_dtype(dtype) -> str:
    if dtype is None:
        return default_dtype()
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use 'float32' or 'bfloat16'")
    return name


def precision_scope(dtype: str):
    """The matmul precision a model's programs are traced under: float32 at full float32 precision
    (`Precision.HIGHEST`; JAX's default lets a GPU run float32 matmuls in TF32, which is not float32),
    16-bit dtypes at JAX's default. Part of each program's cache key, so the two never share a program."""
    return jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits(graphdef, state, ids_bt, impl, mm=None):
    return merge(graphdef, state)(ids_bt, impl, mm)


@jax.jit
def _scores(logits_btv, targets_bt):
    """(log-softmax of `logits` at `targets` [B, T] float32, whether each target is its row's argmax [B, T])."""
    lg = logits_btv.astype(jnp.float32)
    picked = jnp.take_along_axis(lg, targets_bt[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(lg, axis=-1), jnp.argmax(lg, axis=-1) == targets_bt


class Gemma4Model:
    """A loaded Gemma 4 model: `.config`, `.tokenizer`, `.logits(tokens)`."""

    def __init__(self, module: Gemma4Text | None, run: RunConfig, tokenizer: Tokenizer | None = None,
                 path: str | None = None, pipeline=None, towers=None):
        self.config: Gemma4Config = module.cfg if module is not None else pipeline.plan.cfg
        self.run = run
        self.tokenizer = tokenizer
        self.path = path
        self.pipeline = pipeline  # a pipeline.Pipeline when pp > 1
        self.towers = towers  # multimodal.Towers: vision / audio towers of a multimodal checkpoint (pp=1)
        # The parameters as a flat list beside their structure (`model.text.split`): cheap to pass to every call.
        self.graphdef, self.state = split(module) if module is not None else (None, None)
        self.stop_tokens: tuple[int, ...] = stop_ids(path, self.config.eos_token_ids)

    @property
    def context(self) -> int:
        return self.run.max_seq_len or self.config.max_position_embeddings

    @property
    def module(self) -> Gemma4Text:
        """The NNX module (a fresh module over the same parameter arrays); pp=1 only."""
        if self.pipeline is not None:
            raise ConfigError("a pipelined model (pp > 1) has no single NNX module; its stages are in .pipeline")
        return merge(self.graphdef, self.state)

    def _check_tokens(self, tokens) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"tokens must be an integer array [B, T], got shape {ids.shape} of {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ConfigError(f"token ids must lie in [0, {self.config.vocab_size})")
        limit = self.run.max_seq_len or self.config.max_position_embeddings
        if ids.shape[1] > limit:
            raise ConfigError(f"{ids.shape[1]} tokens exceed the context of {limit}")
        return ids.astype(np.int32)

    def _prompts(self, tokens) -> list[list[int]]:
        """`generate`'s prompts as id lists: an int array [B, T], or a list of id sequences of any lengths, each
        checked as `logits` checks its tokens (`_check_tokens`: integer ids in the vocabulary, within the context)."""
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise ConfigError(f"tokens must be a list of id lists or an int array [B, T], got {type(tokens).__name__}")
        if hasattr(tokens, "ndim"):  # a numpy or jax array [B, T]
            return self._check_tokens(tokens).tolist()
        prompts = []
        for p in tokens:
            if isinstance(p, (str, bytes, dict)) or not hasattr(p, "__iter__"):
                raise ConfigError(f"tokens must be a list of id lists or an int array [B, T], got a prompt {p!r:.40}")
            try:
                row = np.asarray(p if hasattr(p, "ndim") else list(p))
            except ValueError:  # ragged nesting
                raise ConfigError("tokens must be a list of id lists or an int array [B, T]") from None
            prompts.append(self._check_tokens(row[None] if row.size else np.zeros((1, 0), np.int64))[0].tolist())
        return prompts

    def _stop_ids(self, stop_tokens) -> tuple[int, ...]:
        """`stop_tokens` as ids: None the checkpoint's end ids, one id, or a sequence of ids (`()`: none)."""
        if stop_tokens is None:
            return self.stop_tokens
        one = isinstance(stop_tokens, numbers.Integral) and not isinstance(stop_tokens, bool)
        ids = (stop_tokens,) if one else tuple(stop_tokens) if hasattr(stop_tokens, "__iter__") and not isinstance(
            stop_tokens, (str, bytes, dict)) else None
        if ids is None or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise ConfigError(f"stop_tokens must be None, a token id or a sequence of token ids, got "
                              f"{stop_tokens!r:.80}")
        ids = tuple(int(t) for t in ids)
        if any(not 0 <= t < self.config.vocab_size for t in ids):
            raise ConfigError(f"stop token ids must lie in [0, {self.config.vocab_size}), got {list(ids)}")
        return ids

    def logits(self, tokens, soft_tokens=None) -> np.ndarray:
        """Float32 soft-capped next-token logits [B, T, V] of a full causal forward over `tokens` [B, T];
        `soft_tokens` (a `model.Multimodal` over [B, T], see `multimodal.soft_tokens`) merges image/audio
        features into their placeholders."""
        ids = self._check_tokens(tokens)
        with precision_scope(self.run.dtype):
            if self.pipeline is not None:
                return self.pipeline.logits(ids, soft_tokens)
            return np.asarray(_logits(self.graphdef, self.state, jnp.asarray(ids), self.run.attn_impl, soft_tokens),
                              dtype=np.float32)

    def token_logprobs(self, tokens, targets) -> tuple[np.ndarray, np.ndarray]:
        """Scores of `targets` [B, T] (target t follows tokens[:, :t+1]; usually the tokens shifted by one) under
        `logits(tokens)`: (their log-probabilities, float32 [B, T]; whether each is the argmax, bool [B, T]).
        Computed where the logits are, so only [B, T] reaches the host (the logits are 1 MiB a token at Gemma
        4's vocabulary); the lm-evaluation-harness model scores with it."""
        ids = self._check_tokens(tokens)
        tg = np.asarray(targets)
        if tg.shape != ids.shape or not np.issubdtype(tg.dtype, np.integer):
            raise ConfigError(f"targets must be an integer array of the tokens' shape {ids.shape}, got {tg.shape} "
                              f"of {tg.dtype}")
        if tg.size and (tg.min() < 0 or tg.max() >= self.config.vocab_size):
            raise ConfigError(f"target ids must lie in [0, {self.config.vocab_size})")
        with precision_scope(self.run.dtype):
            if self.pipeline is not None:
                logits = self.pipeline.device_logits(ids)
            else:
                logits = _logits(self.graphdef, self.state, jnp.asarray(ids), self.run.attn_impl)
            rows = np.zeros((logits.shape[0], ids.shape[1]), np.int32)  # the pipeline pads the batch
            rows[:len(ids)] = tg
            logp, top = _scores(logits, rows)
        return np.asarray(logp, np.float32)[:len(ids)], np.asarray(top)[:len(ids)]

    def generate(self, tokens, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop_tokens=None, on_tokens=None,
                 soft_tokens=None, timings: dict | None = None) -> list[list[int]]:
        """New tokens for each prompt (a list of id lists of any lengths, or an int array [B, T]).

        `temperature=0.0` is greedy. `stop_tokens=None` stops at the checkpoint's end ids (kept as the
        last element); `stop_tokens` may be one id or a sequence of ids; `stop_tokens=()` never stops early.
        `on_tokens(block [B, n])` streams.
        `soft_tokens(t) -> model.Multimodal` merges image/audio features (see `generate_text`). `timings` (a
        dict) receives `prefill_s` and `decode_s`, each timed on its own (benchmarks).
        """
        sampling = check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, vocab=self.config.vocab_size)
        prompts = self._prompts(tokens)
        if not prompts:
            raise ConfigError("there are no prompts: give at least one id list")
        if on_tokens is not None and not callable(on_tokens):
            raise ConfigError(f"on_tokens must be a function of each new block of tokens, got {on_tokens!r:.40}")
        stops = self._stop_ids(stop_tokens)
        with precision_scope(self.run.dtype):
            return generate_tokens(self.graphdef, self.state, self.config, prompts, max_new_tokens=int(max_new_tokens),
                                   context=self.context, dtype=DTYPES[self.run.dtype], sampling=sampling,
                                   seed=int(seed), stop_ids=stops, on_tokens=on_tokens, pipeline=self.pipeline,
                                   impl=self.run.attn_impl, soft_tokens=soft_tokens, timings=timings)

    def generate_continuous(self, tokens, *, max_new_tokens, slots: int = 8, temperature: float = 0.0,
                            top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=None,
                            on_done=None, shared_prefix: bool = False, stats: dict | None = None,
                            prefill_chunk: int | None = None) -> list[list[int]]:
        """New tokens for each prompt (a list of id lists), decoded `slots` at a time with continuous batching
        (`generation/engine.py`): when a sequence ends, the next prompt takes its slot. `max_new_tokens`: one
        limit for all, or one per prompt. Greedy gives what `generate` gives; `on_done(i, tokens)` is called as
        prompt i ends. `shared_prefix`: the tokens all prompts begin with are prefilled once and copied into each
        slot; `stats` (a dict) receives the prompt tokens computed and without that. With pp > 1 the slots are
        the pipeline's ring's rows. A prompt longer than `prefill_chunk` tokens (default
        `generation.engine.PREFILL_CHUNK`, 256) is prefilled in pieces between the other slots' decode steps."""
        from .generation.engine import PREFILL_CHUNK, run_slots

        prompts = self._prompts(tokens)
        each = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, numbers.Integral) else max_new_tokens
        if isinstance(each, (str, bytes, dict)) or not hasattr(each, "__iter__"):
            raise ConfigError(f"max_new_tokens must be an integer or one integer per prompt, "
                              f"got {max_new_tokens!r:.40}")
        limits = [check_count("max_new_tokens", m) for m in each]
        slots = check_count("slots", slots)
        sampling = check_sampling(max_new_tokens=max(limits, default=1), temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=seed, vocab=self.config.vocab_size)
        stops = self._stop_ids(stop_tokens)
        with precision_scope(self.run.dtype):
            return run_slots(self.graphdef, self.state, self.config, prompts, limits, slots=slots,
                             context=self.context, dtype=DTYPES[self.run.dtype], sampling=sampling, seed=int(seed),
                             stop_ids=stops, impl=self.run.attn_impl, on_done=on_done, shared_prefix=shared_prefix,
                             stats=stats, pipeline=self.pipeline,
                             prefill_chunk=PREFILL_CHUNK if prefill_chunk is None else int(prefill_chunk))

    def generate_text(self, prompts, *, chat: bool = True, thinking: bool = False, return_thoughts: bool = False,
                      max_new_tokens: int = 256, images=(), audio=(), max_soft_tokens: int = 280, **sampling):
        """Generate for prompts (strings, or message lists in transformers' format): chat template when `chat`,
        BOS once, decoded without the stop token.

        With the chat template the answer is the text after the model's thought channel
        (`<|channel>thought\n…<channel|>`); `thinking=True` turns the template's thinking mode on, and
        `return_thoughts=True` returns (answer, thoughts) pairs instead of answers.

        `images` (paths, PIL images or HxWx3 arrays; `max_soft_tokens` each, one of 70/140/280/560/1120)
        and `audio` (16 kHz arrays or mono .wav paths) go with a single prompt, at its `<|image|>` /
        `<|audio|>` markers or, without markers, first in the user turn.
        """
        if self.tokenizer is None:
            raise ConfigError("this checkpoint has no tokenizer.json, so text prompts cannot be encoded")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(
                isinstance(p, str) or (isinstance(p, list) and all(isinstance(m, dict) for m in p)) for p in prompts):
            raise ConfigError("prompts must be a string or a non-empty list of strings or message lists, got "
                              f"{prompts!r:.80}")
        if thinking and not chat:
            raise ConfigError("thinking=True needs the chat template: drop chat=False")
        images, audio = list(images or ()), list(audio or ())
        soft = None
        if images or audio:
            prompts, soft = self.media_prompt(prompts, images, audio, max_soft_tokens, chat, thinking)
            ids = prompts
        else:
            if not chat and not all(isinstance(p, str) for p in prompts):
                raise ConfigError("message lists need the chat template: drop chat=False")
            ids = [self.tokenizer.encode_chat(p, thinking) if chat else self.tokenizer.encode(p) for p in prompts]
        outs = self.generate(ids, max_new_tokens=max_new_tokens, soft_tokens=soft, **sampling)
        stops = set(self._stop_ids(sampling.get("stop_tokens")))
        texts = [self.tokenizer.decode(o[:-1] if o and o[-1] in stops else o) for o in outs]
        if not chat:
            return [(t, "") for t in texts] if return_thoughts else texts
        split = [split_thoughts(t) for t in texts]
        return [(answer, thoughts) for thoughts, answer in split] if return_thoughts else [a for _, a in split]

    def media_prompt(self, prompts, images=(), audio=(), max_soft_tokens: int = 280, chat: bool = True,
                     thinking: bool = False):
        """([expanded prompt ids], soft_tokens) for one prompt with images and/or audio: pass both to
        `generate(ids, soft_tokens=...)` (what `generate_text(..., images=, audio=)` does)."""
        if self.towers is None:
            raise ConfigError("this checkpoint has no vision or audio tower (images and audio need a "
                              "Gemma4ForConditionalGeneration checkpoint with them)")
        if len(prompts) != 1:
            raise ConfigError("images and audio go with a single prompt")
        sp = self.towers.ids
        with precision_scope(self.run.dtype):
            img, n_img = self.towers.image_features(images, max_soft_tokens) if images else (None, [])
            aud, n_aud = self.towers.audio_features(audio) if audio else (None, [])
        if isinstance(prompts[0], str):
            text = mmod.with_markers(prompts[0], len(images), len(audio))
            ids = self.tokenizer.encode_chat(text, thinking) if chat else self.tokenizer.encode(text)
        else:  # messages: the template places a marker for each image and audio part
            if not chat:
                raise ConfigError("message lists need the chat template: drop chat=False")
            text = self.tokenizer.chat_prompt(prompts[0], thinking)
            if (text.count(mmod.IMAGE_TEXT), text.count(mmod.AUDIO_TEXT)) != (len(images), len(audio)):
                raise ConfigError(f"the messages render {text.count(mmod.IMAGE_TEXT)} image and "
                                  f"{text.count(mmod.AUDIO_TEXT)} audio markers for {len(images)} image(s) and "
                                  f"{len(audio)} audio clip(s)")
            ids = self.tokenizer.encode(text)
        ids = mmod.expand(ids, n_img, n_aud, sp)

        def soft_tokens(t: int):
            row = np.zeros((1, t), np.int64)
            row[0, :len(ids)] = ids
            return mmod.soft_tokens(row, img, aud, sp)

        return [ids], soft_tokens

    def __repr__(self) -> str:
        c = self.config
        return (f"Gemma4Model({c.name!r}, layers={c.num_layers}, d={c.hidden_size}, dtype={self.run.dtype}, "
                f"pp={self.run.pp})")


def load(path: str | None = None, *, pp: int = 1, dtype=None, max_seq_len: int | None = None,
         progress: bool = True, layer_split=None, attn_impl: str = "auto") -> Gemma4Model:
    """Load a Gemma 4 checkpoint directory as a ready-to-run model (no `path`: the embedded demo model).

    `path` is a Hugging Face directory or one written by `tools/convert_checkpoint.py` (whose stage
    count must equal `pp`). With `pp` > 1 the layers of an HF directory are split balanced by bytes, or
    at `layer_split` (boundaries `0,a,...,L`, a string as `--layer-split` takes it or a sequence of ints, with
    exactly `pp` stages whatever `pp` is; a converted directory's own split). `max_seq_len` (a positive int;
    None: the model's `max_position_embeddings`) caps prompt plus new tokens. `attn_impl` picks the attention
    path: 'auto' (on GPU, per call the fastest measured of the Pallas kernels, cuDNN and XLA; XLA on CPU),
    'xla', 'cudnn' (cuDNN where it applies, XLA elsewhere), 'pallas', or 'interpret' (the kernels in Pallas
    interpret mode, for testing). See `gemma4_jax.kernels.dispatch`.

    `dtype` is 'float32' or 'bfloat16' (default: bfloat16 on GPU, float32 on CPU). Errors are
    `gemma4_jax.Gemma4Error` subclasses with one sentence naming the problem.
    """
    if max_seq_len is not None and (not isinstance(max_seq_len, numbers.Integral) or isinstance(max_seq_len, bool)
                                    or max_seq_len < 1):
        raise ConfigError(f"max_seq_len must be a positive integer (or None: the model's context), got {max_seq_len!r}")
    if path is None:
        path = demo_path()
    ckpt = checkpoint.open(path)  # an HF directory or a converted one, and its config
    path, cfg, manifest = ckpt.path, ckpt.config, ckpt.manifest
    if attn_impl not in IMPLS:
        raise ConfigError(f"attn_impl must be one of {', '.join(IMPLS)}, got {attn_impl!r}")
    if attn_impl in ("cudnn", "pallas") and jax.default_backend() not in ("gpu", "cuda"):
        hint = "; 'interpret' runs the Pallas kernels on the CPU (slowly)" if attn_impl == "pallas" else ""
        raise ConfigError(f"attn_impl {attn_impl!r} needs a CUDA GPU; this process runs on "
                          f"{jax.default_backend()}{hint}")
    run = RunConfig(dtype=resolve_dtype(dtype), pp=pp, max_seq_len=None if max_seq_len is None else int(max_seq_len),
                    attn_impl=attn_impl)
    jdtype = DTYPES[run.dtype]
    if ckpt.converted and manifest["num_stages"] != pp:
            raise ConfigError(
                f"{path} was converted for pp={manifest['num_stages']} but pp={pp} was asked; load it with "
                f"pp={manifest['num_stages']} (--pp {manifest['num_stages']}), or re-convert with python "
                f"tools/convert_checkpoint.py --hf-dir {manifest['source']['hf_dir']} --out NEW_DIR --pp {pp}")
    check_pp(cfg, pp)
    split = None if layer_split is None else layer_split_stages(layer_split, cfg.num_layers)
    if split is not None and len(split) != pp:
        raise ConfigError(f"layer_split {bounds_text(split)} makes {len(split)} stages but pp={pp}: give "
                          f"pp={len(split)}, or {pp + 1} boundaries from 0 to {cfg.num_layers}")
    if split is not None and ckpt.converted and split != sc.manifest_stages(manifest, cfg):
        raise ConfigError(f"layer_split {bounds_text(split)} differs from the split {path} was converted with "
                          f"({bounds_text(sc.manifest_stages(manifest, cfg))}); drop layer_split or re-convert")
    check_devices(pp)  # after the arguments: a bad split is named as such on a machine of any size
    tokenizer = Tokenizer.maybe_load(path)
    if tokenizer is not None:  # the built-in format follows the size class: 26B/31B (no per-layer inputs)
        tokenizer.empty_thoughts = not cfg.ple_dim  # write an empty thought channel when thinking is off
    if pp > 1:
        if ckpt.converted:
            stages = sc.manifest_stages(manifest, cfg)
            mine = {d.id for d in jax.local_devices()}  # with several hosts, each restores only its stages
            leaves = [sc.restore_leaves(path, s.index, lv, jdtype, jax.sharding.SingleDeviceSharding(dev))
                      if dev.id in mine else None
                      for s, lv, dev in zip(stages, stage_leaf_shapes(cfg, stages), jax.devices(), strict=False)]
        else:
            stages = split or best_stages(cfg, pp, jnp.dtype(jdtype).itemsize)
            leaves = split_params(cfg, stages, read_hf_params(path, cfg, jdtype, progress=progress))
        pipe = Pipeline(cfg, stages, leaves, jdtype, attn_impl)
        return Gemma4Model(None, run, tokenizer=tokenizer, path=path, pipeline=pipe,
                           towers=Towers.load(ckpt, cfg.hidden_size, jdtype))
    if ckpt.converted:
        params = sc.load_single_stage(path, cfg, jdtype)
        module = model_from_params(cfg, params, jdtype, put=lambda a: a)
    else:
        params = read_hf_params(path, cfg, jdtype, progress=progress)
        module = model_from_params(cfg, params, jdtype)
    return Gemma4Model(module, run, tokenizer=tokenizer, path=path, towers=Towers.load(ckpt, cfg.hidden_size, jdtype))


def layer_split_stages(layer_split, num_layers: int) -> tuple:
    """The stages of `layer_split`: boundaries `0,a,...,L` as a string (parsed as the converter's `--layer-split`)
    or a sequence of ints, checked by the same rule (`parallel.stages`); one ConfigError sentence otherwise."""
    if isinstance(layer_split, str):
        return parse_layer_split(layer_split, num_layers)
    bounds = list(layer_split) if hasattr(layer_split, "__iter__") and not isinstance(layer_split, (bytes, dict)) \
        else None
    if bounds is None or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in bounds):
        raise ConfigError(f"layer_split must be stage boundaries 0,a,...,{num_layers} (a string like "
                          f"'0,3,{num_layers}' or a sequence of integers), got {layer_split!r:.80}")
    return stages_from_bounds(bounds, num_layers)


def bounds_text(stages: tuple) -> str:
    """'0,a,...,L' of a split."""
    return ",".join(str(b) for b in [s.start for s in stages] + [stages[-1].stop])


def check_pp(cfg: Gemma4Config, pp: int) -> None:
    """`pp` must be a positive integer and at most the layer count."""
    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
        raise ConfigError(f"pp must be a positive integer, got {pp!r}")
    if pp > cfg.num_layers:
        raise ConfigError(f"pp={pp} is more stages than the model's {cfg.num_layers} layers")


def check_devices(pp: int) -> None:
    """`pp` stages need as many devices."""
    n = len(jax.devices())
    if pp > n:
        raise ConfigError(f"pp={pp} needs {pp} devices but only {n} {'is' if n == 1 else 'are'} visible")
