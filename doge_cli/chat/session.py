"""A multi-turn chat with a Doge model: history, sampling settings, streaming replies.

Each turn renders the whole conversation through the tokenizer's chat template and generates with
the inference engine (:mod:`doge_cli.inference`), streaming the reply's text as it grows. Replies of R1 models keep their
``<|begin_of_thought|>…<|end_of_thought|><|begin_of_solution|>…<|end_of_solution|>`` markers in the
history (the format the model was trained on); ``chat_format.ReasoningStream`` splits them for display.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from doge_cli.chat_format import prompt_ids, stop_ids
from doge_cli.inference.sampling import SamplingParams


class ChatSession:
    """The conversation with one model. ``reply`` appends a user turn and the model's answer."""

    def __init__(self, model, tokenizer, *, system: str | None = None, params: SamplingParams | None = None,
                 model_name: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name
        self.system = system or None
        self.params = params or SamplingParams()
        self.params.validate()
        self.messages: list[dict] = []
        self.stop_ids = stop_ids(model.config, tokenizer)
        self.dropped_turns = 0  # of the last reply: old turns left out to fit the context window

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text.strip() if text and text.strip() else None

    def _conversation(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt_ids(self, turns: list[dict]) -> list[int]:
        """Token ids of the conversation up to the assistant header. Oldest turn pairs are dropped while
        prompt + ``max_new_tokens`` exceeds the model's context (``dropped_turns`` counts them)."""
        limit = self.model.config.max_position_embeddings
        self.dropped_turns = 0
        while True:
            ids = prompt_ids(self.tokenizer, self._conversation(turns))
            if len(ids) + self.params.max_new_tokens <= limit or len(turns) <= 1:
                return ids
            turns = turns[2:]
            self.dropped_turns += 2

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Generate the reply to ``user_text``; ``on_text`` receives the decoded text as it grows.
        Returns the raw reply (thought markers kept). The turn is recorded only when generation finishes."""
        from doge_cli.inference import Engine, Request

        turns = [*self.messages, {"role": "user", "content": user_text}]
        request = Request(self.prompt_ids(turns), self.params, stop_token_ids=self.stop_ids, on_text=on_text)
        Engine(self.model, self.tokenizer, max_batch=1).generate([request])
        self.messages = [*turns, {"role": "assistant", "content": request.text}]
        return request.text

    def to_dict(self) -> dict:
        return {"model": self.model_name, "system": self.system, "params": self.params.as_dict(),
                "messages": self._conversation(self.messages)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation as JSON (system turn first), atomically."""
        from doge_cli.io import check_file_target, read_json_object, write_json

        def is_conversation(existing: Path) -> bool:  # a file an earlier /save wrote
            data = read_json_object(existing)
            return data is not None and isinstance(data.get("messages"), list) and "params" in data

        path = check_file_target(path, is_ours=is_conversation, what="conversation file")
        write_json(path, self.to_dict())
        return path
