"""The chat and R1 format, owned here and used by data, training, rewards, chat, eval and generation.

- **Special tokens and template.** Doge's tokenizers use the Llama-3 header scheme. The chat template
  wraps assistant turns in ``{% generation %}`` so ``return_assistant_tokens_mask`` (and TRL's
  assistant-only loss) works; ``eos_token`` is the end-of-turn token, so chat generation stops after one
  reply, and ``pad`` is a token that never occurs in text.
- **The R1 thinking format** (the seed's distillation data): reasoning between the thought markers, the
  final answer between the solution markers, and the system prompt that asks for that layout.
- **Stop ids**: the token ids that end a reply (:func:`eos_ids` for a tokenizer, :func:`stop_ids` for a
  model and its tokenizer); :func:`prompt_ids` renders a conversation for the reply to follow.
- **Reading replies**: :func:`split_reasoning` separates the thinking from the answer (what chat shows and
  what evaluation scores), :class:`ReasoningStream` does it for text that is still streaming (chat, the
  server); :func:`final_answer` takes the checkable answer out of that answer part (what the GRPO
  accuracy reward compares); :func:`last_boxed` reads a ``\\boxed{...}`` answer.
"""

from __future__ import annotations

import re

BOS, EOT, EOD = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
BEGIN_THOUGHT, END_THOUGHT = "<|begin_of_thought|>", "<|end_of_thought|>"
BEGIN_SOLUTION, END_SOLUTION = "<|begin_of_solution|>", "<|end_of_solution|>"
THINKING_TOKENS = (BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION)
SPECIAL_TOKENS = (BOS, EOD, HEADER_START, HEADER_END, EOT, PAD, *THINKING_TOKENS)
# Tokens that end a turn or a text in the tokenizers doge meets (its own, Llama-3 style, ChatML).
END_TOKENS = (EOT, EOD, "<|im_end|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

R1_SYSTEM_PROMPT = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long thinking "
    "process before providing the final precise and accurate solutions. Structure your response in two "
    "sections: Thought and Solution. In the Thought section, reason step by step in the format "
    "<|begin_of_thought|> {thought} <|end_of_thought|>. In the Solution section, give the final, concise "
    "and correct solution in the format <|begin_of_solution|> {solution} <|end_of_solution|>."
)

_BOXED = re.compile(r"\\boxed\s*\{")


# ------------------------------------------------------------------------------ stop ids


def eos_ids(tok) -> list[int]:
    """The ids that end a reply for ``tok``: its EOS, then the end-of-turn / end-of-text tokens it has."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for token in END_TOKENS:
        tid = tok.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid not in ids and tid < len(tok):
            ids.append(tid)
    return ids


def config_eos(tok) -> int | list[int]:
    """:func:`eos_ids` as a model config stores it (one int, or the list)."""
    ids = eos_ids(tok)
    return ids[0] if len(ids) == 1 else ids


def config_eos_ids(model_config) -> list[int]:
    """The EOS ids a model config stores (an int, a list, or None) as a list."""
    eos = model_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def stop_ids(model_config, tok) -> list[int]:
    """Every id that ends a reply of a model: its config's EOS ids, plus its tokenizer's."""
    ids = config_eos_ids(model_config)
    return ids + [i for i in eos_ids(tok) if i not in ids]


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by ``tok``'s chat template, up to the assistant header that the
    reply follows (the template writes the special tokens, so none are added on top)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ reading replies


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced), or None."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


def split_reasoning(text: str) -> tuple[str, str]:
    """``(thinking, answer)`` of a finished reply. Without thought markers the whole text is the answer;
    with a solution section the answer is its content; an unfinished thought has an empty answer."""
    thinking, answer = "", text
    if BEGIN_THOUGHT in text:
        before, rest = text.split(BEGIN_THOUGHT, 1)
        if END_THOUGHT in rest:
            thinking, answer = rest.split(END_THOUGHT, 1)
        else:
            thinking, answer = rest, ""
        answer = before + answer
    if BEGIN_SOLUTION in answer:
        answer = answer.split(BEGIN_SOLUTION, 1)[1]
    answer = answer.split(END_SOLUTION, 1)[0]
    return thinking.strip(), answer.strip()


def final_answer(text: str) -> str:
    """The checkable answer of a reply: in its answer part (:func:`split_reasoning`, so never from the
    thinking), the last ``\\boxed{}``; else, inside a solution section, the whole section; else the
    answer part's last non-empty line."""
    answer = split_reasoning(text)[1]
    boxed = last_boxed(answer)
    if boxed is not None:
        return boxed
    if BEGIN_SOLUTION in text:
        return answer
    lines = [ln.strip() for ln in answer.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class ReasoningStream:
    """Turns streamed text into ``(kind, text)`` pieces, kind ``"thinking"`` or ``"answer"``, markers removed.

    Text that could be the start of a marker is held back until the next piece decides it.
    """

    def __init__(self) -> None:
        self.kind = "answer"
        self._pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._pending += text
        out: list[tuple[str, str]] = []
        while True:
            hits = [(self._pending.find(m), m) for m in THINKING_TOKENS if m in self._pending]
            if not hits:
                break
            pos, marker = min(hits)
            if pos:
                out.append((self.kind, self._pending[:pos]))
            self._pending = self._pending[pos + len(marker):]
            self.kind = "thinking" if marker == BEGIN_THOUGHT else "answer"
        keep = max((n for m in THINKING_TOKENS for n in range(1, len(m)) if self._pending.endswith(m[:n])), default=0)
        emit, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        if emit:
            out.append((self.kind, emit))
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self._pending = self._pending, ""
        return [(self.kind, rest)] if rest else []
