import json

import pytest
from rich.console import Console

from doge_cli.chat.loading import load_model_and_tokenizer
from doge_cli.chat.session import ChatSession
from doge_cli.chat.terminal import answer_once, run_interactive
from doge_cli.inference import SamplingParams

from .conftest import ANSWER, THOUGHT


@pytest.fixture(scope="module")
def parts(r1_model):
    return load_model_and_tokenizer(str(r1_model), device="cpu", need_chat_template=True)


def _run(session, lines):
    console = Console(record=True, width=120, force_terminal=True, color_system="truecolor")
    feed = iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    run_interactive(session, console, read=read)
    return console


def test_answer_once_prints_only_the_solution(parts):
    session = ChatSession(*parts, params=SamplingParams(greedy=True))
    assert answer_once(session, "What is 2+2?") == ANSWER


def test_interactive_turns_commands_and_thinking_style(parts, tmp_path):
    session = ChatSession(*parts, params=SamplingParams(greedy=True))
    out = tmp_path / "c.json"
    console = _run(session, ["hello", "/params temperature=0.5 greedy=false", "/params top_p=7", "/bogus",
                             "second", "/system You are Doge.", f"/save {out}", "/reset", "/exit", "never read"])
    text = console.export_text(clear=False)
    assert f"thinking> {THOUGHT}" in text and f"doge> {ANSWER}" in text
    assert "temperature=0.5" in text and "greedy=False" in text
    assert "top_p must be in (0, 1]" in text and "unknown command /bogus" in text
    saved = json.loads(out.read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages == [] and session.params.temperature == 0.5
    # The reasoning is rendered dim and italic (SGR 2 and 3), the answer without them.
    html = console.export_html(inline_styles=True)
    assert "font-style: italic" in html and f"{THOUGHT}</span>" in html


def test_end_of_input_leaves(parts):
    session = ChatSession(*parts, params=SamplingParams(greedy=True))
    _run(session, ["hi"])
    assert len(session.messages) == 2
