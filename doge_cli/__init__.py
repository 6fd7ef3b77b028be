"""doge: train small Doge language models end to end, offline by default.

Importing this package is cheap: torch, transformers and friends are imported inside the
functions that need them, so ``doge --help`` answers fast.
"""

__version__ = "0.1.0"
