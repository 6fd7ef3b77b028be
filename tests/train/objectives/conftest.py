"""Session fixtures for the post-training stages (helpers live in chat_fixtures.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the tests of this folder import chat_fixtures

from chat_fixtures import chat_root, dpo_data, grpo_data, sft_data, tok  # noqa: E402, F401
