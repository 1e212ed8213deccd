"""towerplus_jax: the Tower+ post-training recipe (CPT -> SFT -> WPO -> GRPO) in JAX/Flax NNX."""
from setuptools import find_packages, setup

HF = ["transformers>=4.56", "torch==2.13.0"]
TFDS = ["tensorflow-datasets>=4.9", "array-record"]
SEQIO = ["seqio"]
# qwix: the oracle of our LoRA numerics (models/lora.py); peft: loads our PEFT adapter exports.
TEST = HF + ["pytest>=8", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "qwix==0.1.8", "peft==0.21.2"]
# The two stacks we support and test: python 3.11 with jax 0.10, python >= 3.12 with jax 0.12.
JAX = ['jax>=0.10.2,<0.11; python_version < "3.12"', 'jax>=0.12.1,<0.13; python_version >= "3.12"']
# The TPU compiler (libtpu, for `python -m towerplus_jax.aot --topology` and TPU runs): wheels for x86-64 Linux only,
# elsewhere this extra installs nothing and aot says so in one line. jax[tpu]==0.12.1 asks for a libtpu that was
# never published (0.0.53): 0.0.52 compiles for it.
_X86_LINUX = 'platform_system == "Linux" and platform_machine == "x86_64"'
TPU = [f'jax[tpu]==0.10.2; python_version < "3.12" and {_X86_LINUX}',
       f'jax==0.12.1; python_version >= "3.12" and {_X86_LINUX}',
       f'libtpu==0.0.52; python_version >= "3.12" and {_X86_LINUX}']

setup(
    name="towerplus_jax",
    version="0.1.0",
    description="JAX/TPU-native Tower+ post-training: CPT, SFT, WPO, GRPO for multilingual translation LLMs",
    packages=find_packages(include=["towerplus_jax", "towerplus_jax.*"]),
    package_data={"towerplus_jax": ["data/sample/*.jsonl"]},
    python_requires=">=3.11",
    entry_points={"console_scripts": ["towerplus = towerplus_jax.cli:main"]},
    install_requires=[
        *JAX,
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
        "tpu": TPU,
        "all": sorted(set(HF + TFDS + SEQIO + TEST)),
    },
)
