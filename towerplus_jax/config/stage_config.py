"""Config sections shared by every stage file in configs/: `base(arg, loss=...)`; a stage edits what differs
and ends with `return finish(c, arg)`.

`arg` is `PRESET[,runlocal]`: a model preset (`tiny`, `tiny_qwen3`, `gemma2_2b`, `qwen2_5_7b`, ...) and optionally
`runlocal`, which shrinks steps/batch/length so any preset's pipeline can be smoke-tested on one machine; `finish`
applies it last, over whatever the stage set.
"""
from __future__ import annotations

import ml_collections

from towerplus_jax import losses
from towerplus_jax.models import config as model_config


def parse_arg(arg: str) -> tuple[str, bool]:
  """`PRESET[,runlocal]` -> (preset, runlocal); an unknown preset or flag fails here, before any run starts."""
  preset, *flags = (arg or "tiny").split(",")
  unknown = set(flags) - {"runlocal"}
  if unknown:
    raise ValueError(f"unknown config flags {sorted(unknown)}; the config argument is PRESET[,runlocal]")
  model_config.preset(preset)
  return preset, "runlocal" in flags


def base(arg: str, *, loss: str) -> ml_collections.ConfigDict:
  preset, _ = parse_arg(arg)
  tiny = preset.startswith("tiny")
  c = ml_collections.ConfigDict()
  c.init_from = ""  # '' = random init; 'hf:DIR' = Hugging Face folder; 'ckpt:WORKDIR' = another stage's run

  c.model = ml_collections.ConfigDict()
  c.model.preset = preset  # models/config.py preset name (ignored when init_from gives the architecture)
  c.model.vocab_size = 0  # 0 = the preset's (random init: the tokenizer's, rounded up to 128)
  c.model.dtype = "float32" if tiny else "bfloat16"  # activations / compute
  c.model.param_dtype = "float32"  # master weights
  # What backward keeps per block: none | full (the block input only; scanned: the scan carry) | dots |
  # dots_no_batch | offload (full, with block inputs in host memory); see models/config.py REMAT_POLICIES.
  # Real presets: full (gemma2_2b SFT, 2 x 2048 rows per v5e chip: 14.5 GiB; dots_no_batch: 26.3 GiB).
  c.model.remat = "none" if tiny else "full"
  # One lax.scan over stacked layer groups (compile time and activation memory flat in depth); False = unrolled.
  # Tiny models stay unrolled: on CPU their train step is ~20% faster so.
  c.model.scan_layers = not tiny
  c.model.attention = "auto"  # auto (splash on TPU, cuDNN on GPU if it can, else xla) | xla | splash | cudnn
  c.model.attention_block = 512  # splash attention q/kv block in tokens (multiple of 128; clipped to seq_len)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data parallelism (replicated params)
  c.mesh.fsdp = -1  # params and batch split here; -1 = all remaining devices
  c.mesh.tensor = 1  # heads / mlp / vocab split here
  # TPU slices (multislice over DCN): data, fsdp and tensor describe one slice; the data axis spans the slices.
  c.mesh.slices = 1

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # comma-separated JSONL/ArrayRecord paths or globs, sample:NAME, tfds:NAME, seqio:TASK
  c.data.eval = ""  # held-out set in the same formats ('' = no eval)
  c.data.seq_len = 128 if tiny else 2048  # tokens per row
  c.data.template = "auto"  # gemma | chatml | auto (= init_from's tokenizer folder's, else the model family's)
  c.data.tokenizer = "auto"  # sample | sp:PATH | hf:PATH | auto (= init_from's; random-init tiny: sample)
  c.data.pack = True  # pack several examples per row (segment ids keep them apart)
  c.data.seed = 0  # shuffling seed
  c.data.max_prompt_len = 0  # rl/preference: longest prompt in tokens (0 = seq_len // 2)
  c.data.precomputed_reference = False  # preference data has ref_*_logp (towerplus_jax.reference): no ref model

  c.train = ml_collections.ConfigDict()
  c.train.steps = 200 if tiny else 10_000  # optimizer steps
  c.train.global_batch_size = 8 if tiny else 256  # rows per step, all hosts together
  c.train.micro_batches = 1  # gradient accumulation: the step's batch is split into this many passes
  c.train.seed = 0  # params init and per-step RNG
  c.train.log_every = 10  # steps between progress lines / metrics rows
  c.train.eval_every = 0 if tiny else 500  # steps between evals (0 = only at the end)
  c.train.eval_steps = 4 if tiny else 50  # eval batches per eval
  c.train.checkpoint_every = 50 if tiny else 500  # steps between checkpoints (and always at the end)
  c.train.keep_checkpoints = 2  # checkpoints kept (the oldest are deleted)
  c.train.async_checkpoint = True  # save in the background while training goes on
  c.train.max_nonfinite = 5  # consecutive skipped (NaN/Inf) updates before the run stops

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3 if tiny else 1e-5  # peak learning rate
  c.optimizer.schedule = "cosine"  # cosine | linear | constant (after warmup)
  c.optimizer.warmup_steps = -1  # -1 = use warmup_ratio
  c.optimizer.warmup_ratio = 0.1  # fraction of steps warming up linearly from 0
  c.optimizer.end_lr_ratio = 0.1  # final lr as a fraction of the peak
  c.optimizer.weight_decay = 0.01  # AdamW decay (not applied to norms and biases)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0  # global-norm gradient clipping (0 = off)
  c.optimizer.mu_dtype = ""  # dtype of Adam's first moment: '' = the param dtype, 'bfloat16' halves its memory

  c.loss = losses.default_config(loss)  # name + every key the loss reads (see towerplus_jax/losses)
  # Tokens per chunk of the log-prob kernel (never [B, T, V] logits); tiny: 0 = full logits, small at a 1k vocab,
  # and chunking's recompute of the head in the backward pass costs ~3-5% on CPU there.
  c.loss.logprob_chunk = 0 if tiny else 512
  return c


def finish(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """The stage's last word: `runlocal` (if `arg` asks) shrinks steps, batch, lengths and rollouts of any preset."""
  if not parse_arg(arg)[1]:
    return c
  c.model.remat = "none"
  c.data.seq_len = 256
  c.train.update(steps=10, eval_steps=2, log_every=1, checkpoint_every=5)
  if "rl" in c:  # the batch and the loss's completion length follow (field references)
    c.rl.update(num_generations=2, prompts_per_step=1, max_completion_len=32)
  else:
    c.train.global_batch_size = 2
    c.data.max_prompt_len = 128
  return c
