"""Weights to and from other ecosystems: one module per foreign format."""
