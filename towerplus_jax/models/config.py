"""Model hyper-parameters: one frozen dataclass for every family, with named presets.

Families: `gemma2`, `gemma3` (text), `qwen2` (Qwen 2 / 2.5), `qwen3`. The flags below are what differ between them;
the decoder in `transformer.py` reads only these flags, never the family name.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Literal, get_args

from etils import epath

Family = Literal["gemma2", "gemma3", "qwen2", "qwen3"]
LayerType = Literal["sliding", "full"]
# What the backward pass keeps of each block (or scanned group of blocks); the rest is recomputed.
#   none: everything (no remat); full: only the block's input (with scan_layers: only the scan carry, one [B, T, D]
#   per group); dots / dots_no_batch: the matmul outputs (without / with batch dims excluded, jax's policies);
#   offload: only the block input, moved to host memory (pinned_host) until the backward pass needs it.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")  # models/attention.py


# The fields a run chooses (compute, layout, kernels), not the weights': a stage config overrides them on any init.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "attention_block", "scan_layers")

@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyper-parameters; names follow the Hugging Face configs where one exists."""

  family: Family
  vocab_size: int
  embed_dim: int
  mlp_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0  # full-attention layers
  rope_local_theta: float | None = None  # sliding layers (Gemma 3); None = rope_theta
  rope_scale: float = 1.0  # linear RoPE scaling of full-attention layers (Gemma 3 4b+: 8)
  query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5; None = head_dim
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[LayerType, ...] = ()  # per layer; () = all full
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = True
  dtype: str = "float32"  # activation/compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # one of REMAT_POLICIES
  attention: str = "auto"  # attention kernel, one of ATTENTION_IMPLS (auto: splash on TPU, cuDNN on GPU, else xla)
  attention_block: int = 512  # splash attention q/kv block (tokens; clipped to the sequence, multiple of 128)
  scan_layers: bool = False  # params of repeating layer-type groups stacked ([G, ...]) and run by one lax.scan

  def __post_init__(self):
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries, num_layers is {self.num_layers}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
    if self.attention_block <= 0 or self.attention_block % 128:
      raise ValueError(f"attention_block={self.attention_block} must be a positive multiple of 128")

  @property
  def is_gemma(self) -> bool:
    """Gemma conventions: (1 + w) RMSNorm, embeddings × sqrt(d), sandwich norms, gelu-tanh MLP."""
    return self.family.startswith("gemma")

  def layer_type(self, i: int) -> LayerType:
    return self.layer_types[i] if self.layer_types else "full"

  @property
  def scan_period(self) -> int:
    """Layers per scanned group: the shortest repeat of `layer_types` (Gemma 2: 2, Gemma 3: 6, Qwen: 1)."""
    types = [self.layer_type(i) for i in range(self.num_layers)]
    return next(p for p in range(1, self.num_layers + 1) if all(t == types[i % p] for i, t in enumerate(types)))

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- Gemma 2
  @classmethod
  def _gemma2(cls, **kw) -> "ModelConfig":
    n = kw["num_layers"]
    base = dict(family="gemma2", vocab_size=256_000, head_dim=256, attn_logit_softcap=50.0,
                final_logit_softcap=30.0, sliding_window=4096, layer_types=alternating(n))
    return cls(**{**base, **kw})

  @classmethod
  def gemma2_2b(cls) -> "ModelConfig":
    return cls._gemma2(embed_dim=2304, mlp_dim=9216, num_layers=26, num_heads=8, num_kv_heads=4,
                       query_pre_attn_scalar=256)

  @classmethod
  def gemma2_9b(cls) -> "ModelConfig":
    return cls._gemma2(embed_dim=3584, mlp_dim=14336, num_layers=42, num_heads=16, num_kv_heads=8,
                       query_pre_attn_scalar=256)

  @classmethod
  def gemma2_27b(cls) -> "ModelConfig":
    return cls._gemma2(embed_dim=4608, mlp_dim=36864, num_layers=46, num_heads=32, num_kv_heads=16,
                       head_dim=128, query_pre_attn_scalar=144)

  # ---------------------------------------------------------------- Gemma 3 (text)
  @classmethod
  def _gemma3(cls, **kw) -> "ModelConfig":
    n = kw["num_layers"]
    base = dict(family="gemma3", vocab_size=262_208, head_dim=256, query_pre_attn_scalar=256,
                sliding_window=1024, layer_types=every_nth_full(n, 6), qk_norm=True, rope_theta=1e6,
                rope_local_theta=10_000.0, rope_scale=8.0)
    return cls(**{**base, **kw})

  @classmethod
  def gemma3_1b(cls) -> "ModelConfig":
    return cls._gemma3(vocab_size=262_144, embed_dim=1152, mlp_dim=6912, num_layers=26, num_heads=4,
                       num_kv_heads=1, sliding_window=512, rope_scale=1.0)

  @classmethod
  def gemma3_4b(cls) -> "ModelConfig":
    return cls._gemma3(embed_dim=2560, mlp_dim=10240, num_layers=34, num_heads=8, num_kv_heads=4)

  @classmethod
  def gemma3_12b(cls) -> "ModelConfig":
    return cls._gemma3(embed_dim=3840, mlp_dim=15360, num_layers=48, num_heads=16, num_kv_heads=8)

  @classmethod
  def gemma3_27b(cls) -> "ModelConfig":
    return cls._gemma3(embed_dim=5376, mlp_dim=21504, num_layers=62, num_heads=32, num_kv_heads=16,
                       head_dim=128, query_pre_attn_scalar=168)

  # ---------------------------------------------------------------- Qwen 2.5
  @classmethod
  def _qwen2(cls, **kw) -> "ModelConfig":
    base = dict(family="qwen2", vocab_size=151_936, head_dim=128, qkv_bias=True, rope_theta=1e6)
    return cls(**{**base, **kw})

  @classmethod
  def qwen2_5_0_5b(cls) -> "ModelConfig":
    return cls._qwen2(embed_dim=896, mlp_dim=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64)

  @classmethod
  def qwen2_5_1_5b(cls) -> "ModelConfig":
    return cls._qwen2(embed_dim=1536, mlp_dim=8960, num_layers=28, num_heads=12, num_kv_heads=2)

  @classmethod
  def qwen2_5_3b(cls) -> "ModelConfig":
    return cls._qwen2(embed_dim=2048, mlp_dim=11008, num_layers=36, num_heads=16, num_kv_heads=2)

  @classmethod
  def qwen2_5_7b(cls) -> "ModelConfig":
    return cls._qwen2(vocab_size=152_064, embed_dim=3584, mlp_dim=18944, num_layers=28, num_heads=28,
                      num_kv_heads=4, tie_embeddings=False)

  @classmethod
  def qwen2_5_14b(cls) -> "ModelConfig":
    return cls._qwen2(vocab_size=152_064, embed_dim=5120, mlp_dim=13824, num_layers=48, num_heads=40,
                      num_kv_heads=8, tie_embeddings=False)

  @classmethod
  def qwen2_5_32b(cls) -> "ModelConfig":
    return cls._qwen2(vocab_size=152_064, embed_dim=5120, mlp_dim=27648, num_layers=64, num_heads=40,
                      num_kv_heads=8, tie_embeddings=False)

  @classmethod
  def qwen2_5_72b(cls) -> "ModelConfig":
    return cls._qwen2(vocab_size=152_064, embed_dim=8192, mlp_dim=29568, num_layers=80, num_heads=64,
                      num_kv_heads=8, tie_embeddings=False)

  # ---------------------------------------------------------------- Qwen 3
  @classmethod
  def _qwen3(cls, **kw) -> "ModelConfig":
    base = dict(family="qwen3", vocab_size=151_936, head_dim=128, qk_norm=True, rope_theta=1e6)
    return cls(**{**base, **kw})

  @classmethod
  def qwen3_0_6b(cls) -> "ModelConfig":
    return cls._qwen3(embed_dim=1024, mlp_dim=3072, num_layers=28, num_heads=16, num_kv_heads=8)

  @classmethod
  def qwen3_1_7b(cls) -> "ModelConfig":
    return cls._qwen3(embed_dim=2048, mlp_dim=6144, num_layers=28, num_heads=16, num_kv_heads=8)

  @classmethod
  def qwen3_4b(cls) -> "ModelConfig":
    return cls._qwen3(embed_dim=2560, mlp_dim=9728, num_layers=36, num_heads=32, num_kv_heads=8)

  @classmethod
  def qwen3_8b(cls) -> "ModelConfig":
    return cls._qwen3(embed_dim=4096, mlp_dim=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                      tie_embeddings=False)

  @classmethod
  def qwen3_14b(cls) -> "ModelConfig":
    return cls._qwen3(embed_dim=5120, mlp_dim=17408, num_layers=40, num_heads=40, num_kv_heads=8,
                      tie_embeddings=False)

  @classmethod
  def qwen3_32b(cls) -> "ModelConfig":
    return cls._qwen3(embed_dim=5120, mlp_dim=25600, num_layers=64, num_heads=64, num_kv_heads=8,
                      tie_embeddings=False)

  # ---------------------------------------------------------------- tiny (CPU tests, embedded default)
  @classmethod
  def tiny(cls, family: Family = "gemma2", vocab_size: int = 1024) -> "ModelConfig":
    """A few-hundred-thousand-parameter model of the given family (sliding window 8 < test sequences)."""
    common = dict(vocab_size=vocab_size, embed_dim=64, mlp_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=16)
    if family == "gemma2":
      return cls._gemma2(**common, query_pre_attn_scalar=16, sliding_window=8)
    if family == "gemma3":
      return cls._gemma3(**common, sliding_window=8, layer_types=("sliding", "full") * 2, rope_scale=2.0)
    if family == "qwen2":
      return cls._qwen2(**common, tie_embeddings=False)
    if family == "qwen3":
      return cls._qwen3(**common, tie_embeddings=False)
    raise ValueError(f"unknown family {family!r}")


def alternating(n: int) -> tuple[LayerType, ...]:
  """Gemma 2: sliding on even layers, global on odd ones."""
  return tuple("sliding" if i % 2 == 0 else "full" for i in range(n))


def every_nth_full(n: int, k: int) -> tuple[LayerType, ...]:
  """Gemma 3: five sliding layers, then one global."""
  return tuple("full" if (i + 1) % k == 0 else "sliding" for i in range(n))


FAMILIES: tuple[Family, ...] = get_args(Family)
PRESETS = tuple(name for name in vars(ModelConfig) if name[0] != "_" and name.split("_")[0] in FAMILIES)


def preset(name: str) -> ModelConfig:
  """`gemma2_2b`, `qwen2_5_7b`, ... or `tiny` / `tiny_<family>`."""
  if name == "tiny":
    return ModelConfig.tiny()
  if name.startswith("tiny_") and name[len("tiny_"):] in FAMILIES:
    return ModelConfig.tiny(name[len("tiny_"):])
  if name not in PRESETS:
    known = sorted(PRESETS) + ["tiny"] + [f"tiny_{f}" for f in FAMILIES]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ValueError(f"unknown model preset {name!r}; {hint}known presets: {', '.join(known)}")
  return getattr(ModelConfig, name)()


def save_json(cfg: ModelConfig, directory: str) -> None:
  """Write `<directory>/model_config.json` (how a run folder records its architecture)."""
  folder = epath.Path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))


def load_json(directory: str) -> ModelConfig:
  path = epath.Path(directory) / "model_config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {directory} a towerplus_jax run folder?")
  d = json.loads(path.read_text())
  return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6·(non-embedding params + lm head) + attention scores (12·L·T·N·H), as MaxText."""
  d, f, n, k, h, layers = (cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.num_layers)
  per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
  return 6 * (layers * per_layer + d * cfg.vocab_size) + 12 * layers * seq_len * n * h
