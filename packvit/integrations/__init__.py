"""Glue to other projects (LLaVA-NeXT, transformers, DeepSpeed). The core never imports these."""
