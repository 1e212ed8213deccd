"""Generation and scoring: the sampler, translation evaluation (CLI: python -m towerplus_jax.evaluate), BLEU/chrF and COMET."""
