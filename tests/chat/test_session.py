import json
import shutil

import pytest

from doge_cli.chat.loading import load_model_and_tokenizer
from doge_cli.chat.session import ChatSession
from doge_cli.chat_format import ReasoningStream, split_reasoning
from doge_cli.errors import DogeError
from doge_cli.inference import SamplingParams

from .conftest import ANSWER, THOUGHT

RAW = f"<|begin_of_thought|> {THOUGHT}<|end_of_thought|><|begin_of_solution|>{ANSWER}<|end_of_solution|>"


@pytest.fixture(scope="module")
def session_parts(r1_model):
    return load_model_and_tokenizer(str(r1_model), device="cpu", need_chat_template=True)


def test_params_parse_validate_and_keep_old_value_on_error():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.repetition_penalty, p.greedy) == (100, 0.8, 0.9, 1.0, False)
    p.set("temperature", "0.5")
    p.set("greedy", "true")
    p.set("max_new_tokens", "7")
    assert (p.temperature, p.greedy, p.max_new_tokens) == (0.5, True, 7)
    for key, value in [("temperature", "0"), ("top_p", "1.5"), ("max_new_tokens", "x"), ("greedy", "maybe"),
                       ("nope", "1")]:
        with pytest.raises(DogeError):
            p.set(key, value)
    assert (p.temperature, p.top_p, p.max_new_tokens) == (0.5, 0.9, 7)


@pytest.mark.parametrize("text, expected", [
    ("plain answer", ("", "plain answer")),
    (RAW, (THOUGHT, ANSWER)),
    ("<|begin_of_thought|> still thinking", ("still thinking", "")),
    ("<|begin_of_thought|>a<|end_of_thought|> free answer", ("a", "free answer")),
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_reasoning_stream_holds_back_partial_markers():
    stream = ReasoningStream()
    pieces = []
    for chunk in ["hi <|begin_of_", "thought|>deep", " thought<|end_of_thought|><|begin_of_sol", "ution|>42<|end",
                  "_of_solution|>"]:
        pieces += stream.feed(chunk)
    pieces += stream.flush()
    merged: list[list[str]] = []
    for kind, text in pieces:
        if merged and merged[-1][0] == kind:
            merged[-1][1] += text
        else:
            merged.append([kind, text])
    assert merged == [["answer", "hi "], ["thinking", "deep thought"], ["answer", "42"]]


def test_reply_streams_and_records_turns(session_parts):
    model, tok = session_parts
    session = ChatSession(model, tok, system="Be brief.", params=SamplingParams(seed=1))  # sampled, yet forced
    chunks: list[str] = []
    assert session.reply("What is 2+2?", on_text=chunks.append) == RAW
    assert "".join(chunks) == RAW
    session.reply("And again?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.to_dict()["messages"][0] == {"role": "system", "content": "Be brief."}
    session.reset()
    assert session.messages == [] and session.system == "Be brief."


def test_old_turns_are_left_out_to_fit_the_context(session_parts):
    model, tok = session_parts
    session = ChatSession(model, tok, params=SamplingParams(greedy=True))
    session.reply("x " * 150)
    session.reply("y " * 150)
    session.params.max_new_tokens = 150  # 512 positions: the first turn no longer fits beside the new one
    session.reply("z")
    assert session.dropped_turns == 2
    assert len(session.messages) == 6  # the history keeps everything; only the prompt was shortened


def test_save_writes_json_atomically(session_parts, tmp_path):
    model, tok = session_parts
    session = ChatSession(model, tok, params=SamplingParams(greedy=True), model_name="m")
    session.reply("hi")
    path = session.save(tmp_path / "chat.json")
    saved = json.loads(path.read_text())
    assert saved["model"] == "m" and saved["messages"][-1] == {"role": "assistant", "content": RAW}
    assert saved["params"]["greedy"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]
    with pytest.raises(DogeError, match="does not exist"):
        session.save(tmp_path / "missing" / "chat.json")


def test_loading_errors(r1_model, tmp_path):
    with pytest.raises(DogeError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nothing"), device="cpu")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(r1_model / name, bare / name)
    with pytest.raises(DogeError, match="no tokenizer"):
        load_model_and_tokenizer(str(bare), device="cpu")
    no_template = tmp_path / "no_template"
    shutil.copytree(r1_model, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(DogeError, match="no chat template"):
        load_model_and_tokenizer(str(no_template), device="cpu", need_chat_template=True)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DogeError, match="not a Doge"):
        load_model_and_tokenizer(str(llama), device="cpu")
