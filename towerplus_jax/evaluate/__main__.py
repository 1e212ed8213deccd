"""`python -m towerplus_jax.evaluate`: see cli.py."""
from towerplus_jax.evaluate import cli

cli.cli()
