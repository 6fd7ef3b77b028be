"""Whether the Hugging Face hub may be used: the one test every command applies.

doge reaches the hub only for a hub id the user gave. The environment switches it off with any of
``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to a true value (1, true,
yes, on: the values huggingface_hub itself accepts), and every doge command then refuses a hub id in one
line instead of waiting on the network.
"""

from __future__ import annotations

import os

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_flags() -> list[str]:
    """The offline variables that are set to a true value."""
    return [var for var in OFFLINE_VARS if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")]


def hub_offline() -> bool:
    """True when the environment has switched the hub off."""
    return bool(offline_flags())
