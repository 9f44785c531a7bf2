"""packvit's version, in a module of its own: ``weights_conversion`` writes it into every checkpoint
it converts, and reads it from here."""

__version__ = "0.1.0"
