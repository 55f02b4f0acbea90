"""Settings and the model registry, as data."""
