"""Token ids to text deltas that are valid UTF-8 and join to exactly the final text.

A byte-level tokenizer can split one character over several tokens; until its last byte arrives the
partial text decodes to U+FFFD. :class:`TextStream` decodes the tokens so far, holds back such an
unfinished tail, and emits only text that extends what it emitted before, so the deltas joined equal
``tokenizer.decode(all tokens)``. The cost is one decode of the reply per token, in the Rust tokenizer.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly "")."""
        self.ids.append(token_id)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""  # an unfinished character, or a decode that is not final yet: wait for more tokens
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def finish(self) -> str:
        """The rest of the text once no token follows."""
        text = self.text()
        if not text.startswith(self.emitted):  # pragma: no cover - byte-level decodes only ever extend
            raise RuntimeError("the tokenizer's decode changed text it had already produced")
        delta, self.emitted = text[len(self.emitted):], text
        return delta
