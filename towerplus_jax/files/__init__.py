"""A run's files: local or cloud storage, Orbax checkpoints, the workdir lock."""
