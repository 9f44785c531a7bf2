"""Glue to other projects (LLaVA-NeXT, transformers, DeepSpeed): each module imports packvit;
nothing in the core of packvit imports them."""
