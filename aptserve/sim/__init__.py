"""Discrete-event simulation around the real scheduler and cache pool (no tensors)."""
