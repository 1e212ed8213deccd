"""towerplus_jax: the Tower+ post-training recipe (CPT, SFT, WPO, GRPO) in JAX."""
from towerplus_jax import host_memory

host_memory.keep_freed_memory()  # before JAX's backend starts (see host_memory)
