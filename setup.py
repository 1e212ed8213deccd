"""towerplus_jax: the Tower+ post-training recipe (CPT -> SFT -> WPO -> GRPO) in JAX/Flax NNX."""
from setuptools import find_packages, setup

HF = ["transformers>=4.56", "torch==2.13.0"]
TFDS = ["tensorflow-datasets>=4.9", "array-record"]
SEQIO = ["seqio"]
TEST = HF + ["pytest>=8", "pytest-xdist", "nbclient", "nbformat", "ipykernel"]

setup(
    name="towerplus_jax",
    version="0.1.0",
    description="JAX/TPU-native Tower+ post-training: CPT, SFT, WPO, GRPO for multilingual translation LLMs",
    packages=find_packages(include=["towerplus_jax", "towerplus_jax.*"]),
    package_data={"towerplus_jax": ["data/sample/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "grain",
        "ml-collections",
        "absl-py",
        "numpy",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "sacrebleu",
        "tensorboardX",
        "array-record",
        "pyyaml",  # COMET hparams.yaml
    ],
    extras_require={
        "hf": HF,
        "tfds": TFDS,
        "seqio": SEQIO,
        "test": TEST,
        "all": sorted(set(HF + TFDS + SEQIO + TEST)),
    },
)
