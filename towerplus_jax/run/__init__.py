"""A run assembled from its config: setup, datasets, the stage chain and the report."""
