"""Glue between packvit and other projects (transformers, LLaVA-NeXT); nothing in packvit imports it."""
