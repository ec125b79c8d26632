"""Pipelines: numbered steps from an input (and a seed) to a result, as generators of progress events."""
