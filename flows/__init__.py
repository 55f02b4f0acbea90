"""Prefect flows: the pipeline from a jobs file to images and a manifest."""
