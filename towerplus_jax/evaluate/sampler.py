"""Batched KV-cache sampling: one jitted prefill + a `while_loop` of one-token decode steps, static shapes.

Prompts come right-padded ([B, P] + lengths); the cache has P + max_new_tokens slots (slot = position), so row b
continues at position `prompt_lengths[b]` while the pad slots after it stay masked until they are overwritten.
The compiled program is cached by jax.jit per (model graph, shapes, static options): repeated GRPO rollouts with
the same shapes, options and mesh never recompile (temperature, top_p and the stop ids, padded to a multiple of
`STOP_SLOTS` with -1, are traced values, not static; "is top-k/top-p on" and top_k itself are).

Log-probs: `logprobs` is log softmax(logits / temperature) of the sampled token, the temperature-scaled
distribution *without* top-k / top-p truncation — what TRL and verl store as log π_old for GRPO, and what the
training loss recomputes from logits / temperature. For greedy decoding the same formula is used.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.data import chat
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Cache, Transformer

STOP_SLOTS = 4


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Host-local numpy results; positions after a row's stop token hold `pad_id` (and log-prob 0)."""
  tokens: np.ndarray  # [B, N] int32
  lengths: np.ndarray  # [B] int32, generated tokens including the stop token
  logprobs: np.ndarray | None  # [B, N] float32, log softmax(logits / temperature)[token]
  truncated: np.ndarray  # [B] bool, no stop token within max_new_tokens


@dataclasses.dataclass(frozen=True)
class _Options:
  """Everything that changes the compiled program (hashable: a static jit argument)."""
  max_new_tokens: int
  truncate: bool  # top-k or top-p in use
  top_k: int  # static: lax.top_k needs it (0 = off)
  pad_id: int
  greedy: bool
  return_logprobs: bool
  rows_sharding: NamedSharding | None  # batch-split rows: prompts and results
  cache_sharding: NamedSharding | None  # [B, S, K, H]: rows as above, kv heads over "tensor"


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: jax.Array | float = 1.0) -> jax.Array:
  """Set to -inf the logits outside the top-k (0 = all), then outside the smallest set of the remaining tokens whose
  renormalised probability reaches top_p (the order of Hugging Face's warpers; top_p >= 1 = no cut). Tokens tied
  with the last kept one are kept. No full-vocabulary sort: `lax.top_k` for the static k, else a bisection on the
  threshold."""
  if top_k > 0:
    # The barrier keeps XLA CPU from rewriting the TopK into a full sort when its result is fused onward (30x).
    top_BK = jax.lax.optimization_barrier(jax.lax.top_k(logits_BV, top_k)[0])
    # Renormalise over every token >= the k-th value (ties included, as Hugging Face's TopKLogitsWarper keeps them).
    mass_B1 = jnp.sum(jnp.where(logits_BV >= top_BK[:, -1:], jnp.exp(logits_BV - top_BK[:, :1]), 0.0), axis=-1,
                      keepdims=True)
    cutoff_B1 = _top_p_cutoff_sorted(top_BK, mass_B1, top_p)
  else:
    cutoff_B1 = _top_p_cutoff_bisect(logits_BV, top_p)
  return jnp.where(logits_BV < cutoff_B1, jnp.asarray(-jnp.inf, logits_BV.dtype), logits_BV)


def _top_p_cutoff_sorted(sorted_BK: jax.Array, mass_B1: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """Smallest kept logit [B, 1] among descending `sorted_BK` (probabilities exp(x - max) / mass_B1): a token stays
  while the probability before it is < top_p."""
  probs_BK = jnp.exp(sorted_BK - sorted_BK[:, :1]) / mass_B1
  before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
  keep_BK = ((before_BK < top_p) | (top_p >= 1.0)).at[:, 0].set(True)
  return jnp.min(jnp.where(keep_BK, sorted_BK, jnp.inf), axis=-1, keepdims=True)


def _order_key(x: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order (for bisection over every float between two logits)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))


def _from_order_key(k: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(jnp.where(k >= 0, k, k ^ jnp.int32(0x7FFFFFFF)), jnp.float32)


def _top_p_cutoff_bisect(logits_BV: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """The top-p cutoff [B, 1] without sorting: the smallest logit value t whose strictly-better mass is < top_p.

  That mass only changes at logit values, so bisecting over the 32-bit order keys of floats ends exactly on one
  (32 passes over the vocabulary: cheaper than a sort of [B, V])."""
  logits_BV = logits_BV.astype(jnp.float32)
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  weights_BV = jnp.exp(logits_BV - max_B1)
  limit_B1 = top_p * jnp.sum(weights_BV, axis=-1, keepdims=True)

  def body(_, bounds):
    lo_B1, hi_B1 = bounds  # predicate false at lo (unless lo == hi), true at hi
    mid_B1 = (lo_B1 >> 1) + (hi_B1 >> 1) + (lo_B1 & hi_B1 & 1)
    mass_B1 = jnp.sum(jnp.where(logits_BV > _from_order_key(mid_B1), weights_BV, 0.0), axis=-1, keepdims=True)
    ok_B1 = mass_B1 < limit_B1
    return jnp.where(ok_B1, lo_B1, mid_B1 + 1), jnp.where(ok_B1, mid_B1, hi_B1)

  lo_B1 = _order_key(jnp.min(logits_BV, axis=-1, keepdims=True))
  _, hi_B1 = jax.lax.fori_loop(0, 32, body, (lo_B1, _order_key(max_B1)))
  return jnp.where(top_p >= 1.0, -jnp.inf, _from_order_key(hi_B1))


def _prefill(model: Transformer, tokens_BP: jax.Array, lengths_B: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """Fill the cache with the whole prompt; logits [B, V] at each row's last prompt token only (never [B, P, V])."""
  positions_BP = jnp.broadcast_to(jnp.arange(tokens_BP.shape[1]), tokens_BP.shape)
  logits_B1V, cache = model.decode(tokens_BP, positions_BP, cache, logits_at=lengths_B - 1)
  return logits_B1V[:, 0], cache


def _pick(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, opts: _Options
          ) -> tuple[jax.Array, jax.Array | None]:
  """Next token per row and its log-prob under the temperature-scaled (untruncated) distribution."""
  scaled_BV = logits_BV / temperature
  if opts.greedy:
    token_B = jnp.argmax(logits_BV, axis=-1)
  else:
    sampled_BV = filter_logits(scaled_BV, opts.top_k, top_p) if opts.truncate else scaled_BV
    token_B = jax.random.categorical(key, sampled_BV, axis=-1)
  token_B = token_B.astype(jnp.int32)
  if not opts.return_logprobs:
    return token_B, None
  logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
  return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, tokens_BP: jax.Array, lengths_B: jax.Array, rng: jax.Array,
              temperature: jax.Array, top_p: jax.Array, stop_S: jax.Array, *, opts: _Options):
  model = nnx.merge(graphdef, state)
  b, p = tokens_BP.shape
  n = opts.max_new_tokens
  cache = model.init_cache(b, p + n)
  if opts.cache_sharding is not None:
    mesh, spec = opts.cache_sharding.mesh, opts.cache_sharding.spec  # a scanned model's [G] axis stays whole
    cache = jax.lax.with_sharding_constraint(
        cache, jax.tree.map(lambda x: NamedSharding(mesh, P(*[None] * (x.ndim - len(spec)), *spec)), cache))
  logits_BV, cache = _prefill(model, tokens_BP, lengths_B, cache)

  def not_finished(carry):
    i, done_B = carry[0], carry[5]
    return (i < n) & ~jnp.all(done_B)

  def step(carry):
    i, logits_BV, cache, out_BN, logp_BN, done_B, count_B = carry
    token_B, logp_B = _pick(logits_BV, jax.random.fold_in(rng, i), temperature, top_p, opts)
    token_B = jnp.where(done_B, opts.pad_id, token_B)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], i, axis=1)
    if logp_B is not None:
      logp_BN = jax.lax.dynamic_update_slice_in_dim(logp_BN, jnp.where(done_B, 0.0, logp_B)[:, None], i, axis=1)
    count_B = count_B + (~done_B).astype(jnp.int32)
    done_B = done_B | jnp.isin(token_B, stop_S)
    logits_B1V, cache = model.decode(token_B[:, None], (lengths_B + i)[:, None], cache)
    return i + 1, logits_B1V[:, 0], cache, out_BN, logp_BN, done_B, count_B

  init = (jnp.int32(0), logits_BV, cache, jnp.full((b, n), opts.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
  _, _, _, out_BN, logp_BN, done_B, count_B = jax.lax.while_loop(not_finished, step, init)
  out = (out_BN, count_B, logp_BN, ~done_B)
  if opts.rows_sharding is None:
    return out
  return jax.lax.with_sharding_constraint(out, (opts.rows_sharding,) * len(out))


def _active_mesh(mesh: Mesh | None) -> Mesh | None:
  if mesh is not None:
    return mesh
  return None if jax.sharding.get_abstract_mesh().empty else jax.sharding.get_mesh()


def _check_args(tokens_BP: np.ndarray, lengths_B: np.ndarray, max_new_tokens: int, temperature: float,
                top_k: int, top_p: float, vocab_size: int) -> None:
  if tokens_BP.ndim != 2 or lengths_B.shape != tokens_BP.shape[:1]:
    raise ValueError(f"sample: prompt_tokens must be [B, P] and prompt_lengths [B], got {tokens_BP.shape} and "
                     f"{lengths_B.shape}")
  bad = np.flatnonzero((lengths_B < 1) | (lengths_B > tokens_BP.shape[1]))
  if bad.size:
    raise ValueError(f"sample: prompt_lengths must be in [1, {tokens_BP.shape[1]}]; rows {bad[:8].tolist()} have "
                     f"{lengths_B[bad[:8]].tolist()}")
  if max_new_tokens < 1:
    raise ValueError(f"sample: max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature <= 0:
    raise ValueError(f"sample: temperature must be > 0 (greedy=True gives argmax; the log-probs still use the "
                     f"temperature), got {temperature}")
  if not 0 <= top_k <= vocab_size:
    raise ValueError(f"sample: top_k must be in [0, {vocab_size}], got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")


def _options(cfg: ModelConfig, mesh: Mesh | None, global_rows: int, max_new_tokens: int, top_k: int, top_p: float,
             greedy: bool, return_logprobs: bool, pad_id: int) -> _Options:
  """The static options of `_generate`: rows split over the batch axes, the cache's kv heads over "tensor"."""
  rows_sharding = cache_sharding = None
  if mesh is not None:
    rows_spec = sharding.batch_spec(1, mesh, global_rows)
    kv_spec = sharding.logical_to_spec(("kv_heads",), (cfg.num_kv_heads,), mesh)
    rows_sharding = NamedSharding(mesh, rows_spec)
    cache_sharding = NamedSharding(mesh, P(rows_spec[0], None, kv_spec[0], None))
  truncate = not greedy and (top_k > 0 or top_p < 1.0)
  return _Options(max_new_tokens, truncate, top_k if truncate else 0, pad_id, greedy, return_logprobs,
                  rows_sharding, cache_sharding)


def lower(graphdef: nnx.GraphDef, state: nnx.State, rows: int, prompt_len: int, *, mesh: Mesh, max_new_tokens: int,
          top_k: int = 0, top_p: float = 1.0, greedy: bool = False, return_logprobs: bool = True
          ) -> jax.stages.Lowered:
  """The program `sample` runs (prefill, then the decode loop over a KV cache of prompt_len + max_new_tokens slots)
  for `rows` global prompt rows, lowered from abstract state (`jax.ShapeDtypeStruct`s): for memory checks (aot)."""
  opts = _options(nnx.merge(graphdef, state).cfg, mesh, rows, max_new_tokens, top_k, top_p, greedy,
                  return_logprobs, 0)
  tokens = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32, sharding=opts.rows_sharding)
  lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=opts.rows_sharding)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  with jax.set_mesh(mesh):
    return _generate.lower(graphdef, state, tokens, lengths, jax.eval_shape(lambda: jax.random.key(0)), scalar,
                           scalar, jax.ShapeDtypeStruct((STOP_SLOTS,), jnp.int32), opts=opts)


def sample(model: Transformer, prompt_tokens_BP, prompt_lengths_B, *, max_new_tokens: int, rng: jax.Array,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
           pad_id: int = 0, greedy: bool = False, return_logprobs: bool = True,
           mesh: Mesh | None = None) -> SampleOutput:
  """Continue each right-padded prompt row by up to `max_new_tokens` tokens (temperature, top-k, top-p or greedy).

  Prompts are host-local rows (numpy); with a mesh (the `mesh` argument or the one set by `jax.set_mesh`) they
  form one global batch split over the batch axes, the KV cache is split likewise (kv heads over "tensor"), the
  parameters keep their own sharding, and each host gets its own rows back.
  """
  tokens_BP = np.asarray(prompt_tokens_BP, np.int32)
  lengths_B = np.asarray(prompt_lengths_B, np.int32)
  _check_args(tokens_BP, lengths_B, max_new_tokens, temperature, top_k, top_p, model.cfg.vocab_size)
  mesh = _active_mesh(mesh)
  batch = {"tokens": tokens_BP, "lengths": lengths_B}
  opts = _options(model.cfg, mesh, tokens_BP.shape[0] * jax.process_count(), max_new_tokens, top_k, top_p, greedy,
                  return_logprobs, pad_id)
  if mesh is not None:
    batch = sharding.shard_local_batch(batch, mesh)
  stop_S = np.full((-(-max(len(stop_ids), 1) // STOP_SLOTS) * STOP_SLOTS,), -1, np.int32)
  stop_S[:len(stop_ids)] = stop_ids
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, batch["tokens"], batch["lengths"], rng, jnp.float32(temperature),
                  jnp.float32(top_p), stop_S, opts=opts)
  tokens, lengths, logprobs, truncated = (_host_rows(x, mesh) for x in out)
  return SampleOutput(tokens, lengths, logprobs if return_logprobs else None, truncated)


def sample_global(model: Transformer, prompt_tokens_RP, prompt_lengths_R, *, mesh: Mesh | None = None,
                  **options) -> SampleOutput:
  """`sample` of one global batch of R rows that every host holds whole: each host samples only the rows its devices
  hold (the same call and shapes on every host, one key), then every host gets all R rows back in order."""
  mesh = _active_mesh(mesh)
  if mesh is None:
    return sample(model, prompt_tokens_RP, prompt_lengths_R, **options)
  rows = sharding.process_rows(mesh, len(prompt_tokens_RP))
  out = sample(model, np.asarray(prompt_tokens_RP)[rows], np.asarray(prompt_lengths_R)[rows], mesh=mesh, **options)
  local = {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if getattr(out, f.name) is not None}
  return dataclasses.replace(out, **dict(zip(local, sharding.gather_rows(rows, list(local.values())))))


def _model_mesh(model: nnx.Module) -> Mesh | None:
  """The mesh the model's parameters are laid out on (None when they are not on a mesh)."""
  for x in jax.tree.leaves(nnx.state(model)):
    if isinstance(getattr(x, "sharding", None), NamedSharding):
      return x.sharding.mesh
  return None


def _host_rows(x: jax.Array, mesh: Mesh | None) -> np.ndarray:
  """This host's rows of a batch-sharded global array."""
  if mesh is None or jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, x.sharding.spec))


def _bucket(n: int, smallest: int = 16) -> int:
  """Next power of two >= n (at least `smallest`): few distinct prompt shapes, so few compilations."""
  return max(smallest, 1 << (n - 1).bit_length())


def generate_text(model: Transformer, tokenizer, template: str | None, prompts: Sequence[str | list[dict]], *,
                  max_new_tokens: int = 256, batch_size: int = 16, greedy: bool = True, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, mesh: Mesh | None = None) -> list[str]:
  """Completions of `prompts` (user strings or chat message lists) through the chat `template`, greedy by default.

  With `template=None` prompts must be plain strings, encoded as they are and stopped at `tokenizer.eos_id`.
  Batches are padded to `batch_size` rows (rounded up to a multiple of the mesh's batch shards) and a power-of-two
  prompt length, so an evaluation compiles only a few times. On a mesh (`mesh`, the one set by `jax.set_mesh`, else
  the model's) spanning several hosts, every host passes every prompt, decodes only the rows its devices hold and
  gets all texts back: the same texts as one host. The text stops before the first stop token.
  """
  if template is None:
    if not all(isinstance(p, str) for p in prompts):
      raise ValueError("generate_text: template=None needs plain-string prompts (chat messages need a template)")
    encoded = [tokenizer.encode(p) for p in prompts]
    stops = (tokenizer.eos_id,)
  else:
    messages = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    encoded = [chat.encode_chat(tokenizer, template, m, add_generation_prompt=True)[0] for m in messages]
    stops = tuple(chat.stop_ids(tokenizer, template))
  empty = [i for i, ids in enumerate(encoded) if not ids]
  if empty:
    raise ValueError(f"generate_text: prompts {empty[:8]} encode to no tokens")
  mesh = _active_mesh(mesh) or _model_mesh(model)
  if mesh is not None:
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH)
    batch_size = -(-batch_size // shards) * shards
  rng, texts = jax.random.key(seed), []
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    tokens_BP = np.full((batch_size, _bucket(max(map(len, chunk)))), tokenizer.pad_id, np.int32)
    lengths_B = np.ones((batch_size,), np.int32)  # filler rows: one pad token
    for i, ids in enumerate(chunk):
      tokens_BP[i, :len(ids)], lengths_B[i] = ids, len(ids)
    out = sample_global(model, tokens_BP, lengths_B, max_new_tokens=max_new_tokens,
                        rng=jax.random.fold_in(rng, start), temperature=temperature, top_k=top_k, top_p=top_p,
                        stop_ids=stops, pad_id=tokenizer.pad_id, greedy=greedy, return_logprobs=False, mesh=mesh)
    for i in range(len(chunk)):
      ids = out.tokens[i, :out.lengths[i]].tolist()
      texts.append(tokenizer.decode(ids if out.truncated[i] else ids[:-1]))
  return texts
