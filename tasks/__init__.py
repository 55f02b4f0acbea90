"""Prefect tasks and the pipeline stages they call: read, validate, plan, dispatch, store, journal, manifest."""
