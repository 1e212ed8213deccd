"""Every config key, declared once in `KEYS`: its default, a one-line doc and the values it takes. The stage configs
are built from it (stage_config.base), config_check checks against it and configs/KEYS.md is printed from it:

  python -m towerplus_jax.config.keys > configs/KEYS.md

A key's type is its default's, as ml_collections types a field (an int passes for a float).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from towerplus_jax.data import chat
from towerplus_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES
from towerplus_jax.models.lora import DEFAULT_TARGETS


class Sized(NamedTuple):
  """A default that differs between tiny presets (CPU tests, seconds) and real ones."""
  tiny: Any
  real: Any


class PerLoss(dict):
  """A default that differs between the losses reading the key: {loss name: value}."""


class SameAs(NamedTuple):
  """The key at `path`: one field (a reference) where the stage has both, else that key's default; its checks."""
  path: str


class Given(NamedTuple):
  """Set by `stage_config.base(arg, loss=...)`: the config argument's `preset`, or the stage's `loss`."""
  what: str


class Rule(NamedTuple):
  """A range: `ok(value)`, else the value `must` be ... ('must be >= 1')."""
  ok: Callable[[Any], bool]
  must: str


def at_least(n: int, why: str = "") -> Rule:
  return Rule(lambda v: v >= n, f"must be >= {n}" + (f" ({why})" if why else ""))


POSITIVE = Rule(lambda v: v > 0, "must be > 0")
FRACTION = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
MESH_AXIS = Rule(lambda v: v == -1 or v >= 1, "must be -1 (the remaining devices) or >= 1")
DTYPES = ("float32", "bfloat16", "float16")
LM, PREFERENCE, GRPO = ("lm", "sft"), ("dpo", "wpo"), ("grpo",)
LOSSES = LM + PREFERENCE + GRPO  # the registry's names (tests/test_model_config.py checks they agree)


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key."""
  path: str  # dotted, from a stage config's root ('train.steps'); from the chain config's with chain=True
  default: Any  # a value, Sized(tiny, real), PerLoss(...), SameAs(path) or Given(what)
  doc: str  # one line
  rule: Rule | None = None  # range
  choices: tuple | None = None  # allowed values
  losses: tuple[str, ...] = ()  # only in stages whose loss is one of these (() = every stage)
  chain: bool = False  # a key of the chain config (configs/tower_plus.py), not of a stage


KEYS: tuple[Key, ...] = (
    Key("init_from", "", "'' = random init; 'hf:DIR' = a Hugging Face folder; 'ckpt:WORKDIR' = another stage's run; "
        "'peft:DIR' = a PEFT LoRA adapter on its base (base_model_name_or_path), continued"),

    Key("model.preset", Given("preset"), "models/config.py preset (ignored when init_from gives the architecture)"),
    Key("model.vocab_size", 0, "0 = the preset's (random init: the tokenizer's, rounded up to 128)", at_least(0)),
    Key("model.dtype", Sized("float32", "bfloat16"), "activations / compute", choices=DTYPES),
    Key("model.param_dtype", "float32", "master weights", choices=DTYPES),
    # full: the block input only (scanned: the scan carry); offload: full, with block inputs in host memory.
    # gemma2_2b SFT, 2 x 2048 rows per v5e chip: full 14.5 GiB, dots_no_batch 26.3 GiB.
    Key("model.remat", Sized("none", "full"), "what backward keeps per block (models/config.py REMAT_POLICIES)",
        choices=REMAT_POLICIES),
    # Tiny models stay unrolled: on CPU their train step is ~20% faster so.
    Key("model.scan_layers", Sized(False, True),
        "one lax.scan over stacked layer groups (compile time and activation memory flat in depth); False = unrolled"),
    Key("model.attention", "auto", "auto = splash on TPU, cuDNN on GPU if it can, else xla", choices=ATTENTION_IMPLS),
    Key("model.attention_block", 512, "splash attention q/kv block in tokens (multiple of 128; clipped to seq_len)"),

    Key("mesh.data", 1, "pure data parallelism (replicated params)", MESH_AXIS),
    Key("mesh.fsdp", -1, "params and batch split here; -1 = all remaining devices", MESH_AXIS),
    Key("mesh.tensor", 1, "heads / mlp / vocab split here", MESH_AXIS),
    Key("mesh.slices", 1, "TPU slices (multislice over DCN): data, fsdp, tensor describe one; the data axis spans them",
        at_least(1)),

    # models/lora.py: each adapted projection computes x W + alpha/rank * (x A) B; the base W is frozen.
    Key("lora.rank", 0, "LoRA adapter rank; 0 = full fine-tuning", at_least(0)),
    Key("lora.alpha", 16.0, "adapter scale alpha / rank", POSITIVE),
    Key("lora.dropout", 0.0, "dropout on the adapters' input (only 0 is implemented)", FRACTION),
    Key("lora.targets", DEFAULT_TARGETS,
        "regex (re.search) over module names layers.N.self_attn.{q,k,v,o}_proj, layers.N.mlp.{gate,up,down}_proj"),
    Key("lora.base_dtype", "bfloat16", "dtype of the frozen base under adapters; int8/int4 = QLoRA (projections "
        "quantised per output channel, models/quant.py; the rest bfloat16)", choices=("bfloat16", "float32", "int8",
                                                                                       "int4")),

    Key("data.train", "", "comma-separated JSONL/ArrayRecord paths or globs, sample:NAME, tfds:NAME, seqio:TASK"),
    Key("data.eval", "", "held-out set in the same formats ('' = no eval)"),
    Key("data.seq_len", Sized(128, 2048), "tokens per row", at_least(2, "a row needs an input and a target token")),
    Key("data.template", "auto", "chat template; auto = init_from's tokenizer folder's, else the model family's",
        choices=("auto", *chat.TEMPLATES)),
    Key("data.tokenizer", "auto", "sample, sp:PATH, hf:PATH or auto (= init_from's; random-init tiny: sample)"),
    Key("data.pack", True, "pack several examples per row (segment ids keep them apart); dpo/wpo: whole pairs; "
        "grpo: the rollout's prompt ⧺ completion sequences"),
    Key("data.seed", 0, "shuffling seed"),
    Key("data.max_prompt_len", 0, "rl/preference: longest prompt in tokens (0 = seq_len // 2)", at_least(0)),
    Key("data.precomputed_reference", False, "preference data has ref_*_logp (towerplus_jax.reference): no ref model"),

    Key("train.steps", Sized(200, 10_000), "optimizer steps", at_least(1)),
    Key("train.global_batch_size", Sized(8, 256), "rows per step, all hosts together", at_least(1)),
    Key("train.micro_batches", 1, "gradient accumulation: the batch is split into this many passes", at_least(1)),
    Key("train.seed", 0, "params init and per-step RNG"),
    Key("train.log_every", 10, "steps between progress lines / metrics rows", at_least(1)),
    Key("train.eval_every", Sized(0, 500), "steps between evals (0 = only at the end)", at_least(0)),
    Key("train.eval_steps", Sized(4, 50), "eval batches per eval", at_least(1)),
    Key("train.checkpoint_every", Sized(50, 500), "steps between checkpoints (and always at the end)", at_least(0)),
    Key("train.keep_checkpoints", 2, "checkpoints kept (the oldest are deleted)",
        at_least(1, "the final checkpoint is always kept")),
    Key("train.async_checkpoint", True, "save in the background while training goes on"),
    Key("train.max_nonfinite", 5, "consecutive skipped (NaN/Inf) updates before the run stops", at_least(1)),

    Key("optimizer.lr", Sized(1e-3, 1e-5), "peak learning rate", POSITIVE),
    Key("optimizer.schedule", "cosine", "decay after warmup", choices=("cosine", "linear", "constant")),
    Key("optimizer.warmup_steps", -1, "linear warmup steps from 0 (-1 = use warmup_ratio)", at_least(-1)),
    Key("optimizer.warmup_ratio", 0.1, "fraction of steps warming up linearly from 0", FRACTION),
    Key("optimizer.end_lr_ratio", 0.1, "final lr as a fraction of the peak", at_least(0)),
    Key("optimizer.weight_decay", 0.01, "AdamW decay (not applied to norms and biases)", at_least(0)),
    Key("optimizer.b1", 0.9, "Adam first-moment decay", FRACTION),
    Key("optimizer.b2", 0.999, "Adam second-moment decay", FRACTION),
    Key("optimizer.eps", 1e-8, "Adam denominator epsilon", POSITIVE),
    Key("optimizer.clip_norm", 1.0, "global-norm gradient clipping", at_least(0, "0 = no clipping")),
    Key("optimizer.mu_dtype", "", "dtype of Adam's first moment: '' = the param dtype, bfloat16 halves its memory",
        choices=("", *DTYPES)),

    Key("loss.name", Given("loss"), "the loss (towerplus_jax/losses registry)", choices=LOSSES),
    # Tiny: full logits, small at a 1k vocab; chunking's recompute of the head in the backward pass costs ~3-5% there.
    Key("loss.logprob_chunk", Sized(0, 512),
        "tokens per chunk of the log-prob kernel, never [B, T, V] logits (0 = full logits)", at_least(0)),
    Key("loss.z_loss", 0.0, "add z_loss·logsumexp² to keep logits bounded (1e-4 is common)", at_least(0), losses=LM),
    Key("loss.beta", PerLoss(dpo=0.1, wpo=0.01), "β: the implicit KL weight of the preference loss", POSITIVE,
        losses=PREFERENCE),
    Key("loss.label_smoothing", 0.0, "ε: assumed fraction of flipped preference labels (conservative DPO)",
        Rule(lambda v: 0 <= v <= 0.5, "must be in [0, 0.5]"), losses=PREFERENCE),
    Key("loss.wpo_weighting", PerLoss(dpo=False, wpo=True), "weight each pair by its policy probability (WPO)",
        losses=PREFERENCE),
    Key("loss.epsilon_low", 0.2, "ratio clipped below at 1 - epsilon_low", FRACTION, losses=GRPO),
    Key("loss.epsilon_high", 0.2, "ratio clipped above at 1 + epsilon_high (0.28: DAPO clip-higher)", at_least(0),
        losses=GRPO),
    Key("loss.beta", 0.0, "k3 KL weight to the reference policy (0 = no reference model in memory)", at_least(0),
        losses=GRPO),
    Key("loss.aggregation", "token_mean", "how per-token losses become the loss (losses/grpo.py)",
        choices=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"), losses=GRPO),
    Key("loss.temperature", SameAs("rl.temperature"), "log-probs of logits / temperature, as the rollout sampled",
        losses=GRPO),
    Key("loss.max_completion_len", SameAs("rl.max_completion_len"),
        "the per-sequence normaliser of seq_mean_token_sum_norm", losses=GRPO),

    Key("rl.num_generations", Sized(4, 8), "G completions per prompt",
        at_least(2, "advantages are relative to the group"), losses=GRPO),
    Key("rl.prompts_per_step", Sized(4, 32), "prompts per rollout (rows per step = prompts_per_step · G)", at_least(1),
        losses=GRPO),
    Key("rl.iterations", 1, "μ: optimizer steps per rollout batch (> 1: old log-probs by a training forward pass)",
        at_least(1), losses=GRPO),
    Key("rl.max_completion_len", Sized(24, 512), "new tokens per completion", at_least(1), losses=GRPO),
    Key("rl.temperature", 1.0, "sampling temperature", POSITIVE, losses=GRPO),
    Key("rl.top_k", 0, "sample from the k likeliest tokens", at_least(0, "0 = off"), losses=GRPO),
    Key("rl.top_p", 1.0, "nucleus sampling", Rule(lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)"), losses=GRPO),
    Key("rl.scale_rewards", True, "divide advantages by the group std (False = Dr.GRPO)", losses=GRPO),
    Key("rl.std_ddof", 1, "group std: 1 = Bessel-corrected (TRL, Tunix), 0 = population std",
        Rule(lambda v: v in (0, 1), "must be 0 (population std) or 1 (Bessel-corrected, as TRL)"), losses=GRPO),
    Key("rl.mask_truncated", False, "drop completions that hit max_completion_len from the loss", losses=GRPO),
    # Tiny: chrF alone, the reward a tiny model raises visibly in 30 steps (rules and format rewards stay near
    # constant there and only add noise to the mean).
    Key("rl.rewards", Sized(("chrf",), ("chrf", "rules", "format")),
        "names in towerplus_jax.rl.rewards or dotted paths pkg.mod:fn", losses=GRPO),
    Key("rl.reward_weights", Sized((1.0,), (1.0, 1.0, 0.2)), "one weight per reward function", losses=GRPO),
    # Reward "comet": wmt22-comet-da needs references, CometKiwi scores rows without. Each process scores its own rows
    # on an fsdp mesh over its local devices (XCOMET-XXL fits), independent of the policy's mesh.
    Key("rl.comet_model", "", "COMET folder (checkpoints/model.ckpt + hparams.yaml) for the comet reward", losses=GRPO),
    Key("rl.comet_batch_size", 16, "COMET rows scored together (one compiled program per length bucket)", at_least(1),
        losses=GRPO),

    Key("stage_order", ("cpt", "sft", "wpo", "grpo"), "stages (configs/NAME.py) run in this order, each in "
        "WORKDIR/NAME", chain=True),
    Key("eval_data", "sample:test", "translation test set scored (chrF, BLEU) after every stage ('' = none)",
        chain=True),
    Key("eval_max_new_tokens", 48, "greedy decoding budget per test sentence", at_least(1), chain=True),
)


def stage_keys(loss: str) -> tuple[Key, ...]:
  """The keys of a stage that trains `loss`."""
  return tuple(k for k in KEYS if not k.chain and (not k.losses or loss in k.losses))


def chain_keys() -> tuple[Key, ...]:
  return tuple(k for k in KEYS if k.chain)


def find(path: str, loss: str = "", chain: bool = False) -> Key | None:
  """The key at `path` of a stage training `loss` (or another loss's, when `loss` has none there), or of a chain."""
  found = [k for k in KEYS if k.path == path and k.chain == chain]
  return next((k for k in found if not k.losses or loss in k.losses), found[0] if found else None)


def source(key: Key, loss: str = "") -> Key:
  """The key whose default and checks `key` has: itself, or the key it is the same field as."""
  return find(key.default.path, loss or key.losses[0]) if isinstance(key.default, SameAs) else key


def default(key: Key, preset: str = "", loss: str = "") -> Any:
  """`key`'s default in a stage of `preset` ('' = a real one) training `loss`."""
  d = source(key, loss).default
  if isinstance(d, Sized):
    return d.tiny if preset.startswith("tiny") else d.real
  if isinstance(d, PerLoss):
    return d[loss or next(iter(d))]
  if isinstance(d, Given):
    return {"preset": preset, "loss": loss}[d.what]
  return d


def value_type(key: Key) -> type:
  """What `key`'s values are: its default's type."""
  return type(default(key))


def choices(key: Key) -> tuple | None:
  """`key`'s allowed values (None: any of its type)."""
  return key.choices


def loss_defaults(loss: str) -> dict[str, Any]:
  """Every `loss.*` key `loss` reads (but its name), at its default outside a stage (a real preset's)."""
  return {k.path.removeprefix("loss."): default(k, "", loss) for k in stage_keys(loss)
          if k.path.startswith("loss.") and k.path != "loss.name"}


def _default_text(key: Key) -> str:
  d = key.default
  if isinstance(d, Sized):
    return f"`{d.real!r}` (tiny: `{d.tiny!r}`)"
  if isinstance(d, PerLoss):
    return ", ".join(f"{loss}: `{v!r}`" for loss, v in d.items())
  if isinstance(d, SameAs):
    return f"= `{d.path}`"
  if isinstance(d, Given):
    return {"preset": "the config argument's PRESET", "loss": "the stage's loss"}[d.what]
  return f"`{d!r}`"


def _check_text(key: Key) -> str:
  k = source(key)
  allowed = choices(k)
  text = value_type(k).__name__
  if k.rule:
    text += ", " + k.rule.must.removeprefix("must be ")
  if allowed:
    text += ", one of " + ", ".join(f"`{v}`" if v else "`''`" for v in allowed)
  return text


def markdown() -> str:
  """The table as markdown: key, default, doc, check."""
  rows = []
  for k in KEYS:
    where = " (chain)" if k.chain else f" ({', '.join(k.losses)})" if k.losses else ""
    cells = (f"`{k.path}`{where}", _default_text(k), k.doc, _check_text(k))
    rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return ("# Config keys\n\n"
          "Generated from `towerplus_jax/config/keys.py` by `python -m towerplus_jax.config.keys > configs/KEYS.md`;"
          " do not edit.\n\n"
          "Every stage (configs/cpt.py, sft.py, wpo.py, grpo.py) has the keys without a loss in brackets, plus those of"
          " its loss; (chain): the keys of configs/tower_plus.py, whose `stages.NAME` are stage configs. Defaults are"
          " before the stage file's changes; tiny: the tiny presets'.\n\n"
          "| key | default | doc | check |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
  print(markdown(), end="")
