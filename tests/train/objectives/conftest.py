"""Session fixtures for the post-training stages (helpers live in chat_fixtures.py)."""

from .chat_fixtures import chat_root, dpo_data, grpo_data, sft_data, tok  # noqa: F401
