"""``doge chat`` end to end: a pseudo-terminal session, --prompt, piped stdin and the error cases."""

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests.chat.toymodel import save_forced_r1_model
from tests.cli.helpers import run_doge as _doge


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatcli")
    return save_forced_r1_model(root, "the", "4")



class Terminal:
    """A child process on a pseudo-terminal, read until a marker appears."""

    def __init__(self, argv):
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while marker not in self.buffer:
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout}s; got: {self.buffer[-2000:]!r}")
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"terminal closed before {marker!r}; got: {self.buffer[-2000:]!r}")
            self.buffer += data.decode("utf-8", errors="replace")
        seen, _, self.buffer = self.buffer.partition(marker)
        return seen

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            os.close(self.master)


def test_two_turns_save_reset_exit_on_a_pty(model_dir, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    term = Terminal([sys.executable, "-m", "doge_cli", "chat", str(model_dir), "--system", "Be brief."])
    try:
        term.read_until("you>")
        term.send("What is 2+2?")
        reply = term.read_until("you>")
        assert "thinking>" in reply and "doge>" in reply and "4" in reply
        term.send("And 3+1?")
        term.read_until("you>")
        term.send(f"/save {first}")
        assert "saved to" in term.read_until("you>")
        term.send("/reset")
        assert "conversation cleared" in term.read_until("you>")
        term.send("Hello again")
        term.read_until("you>")
        term.send(f"/save {second}")
        term.read_until("you>")
        term.send("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    roles = [m["role"] for m in json.loads(first.read_text())["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    after_reset = json.loads(second.read_text())["messages"]
    assert [m["content"] for m in after_reset[:2]] == ["Be brief.", "Hello again"] and len(after_reset) == 3


def test_prompt_mode_prints_only_the_answer(model_dir, capsys):
    code, out, err = _doge(capsys, "chat", str(model_dir), "--prompt", "What is 2+2?", "--greedy")
    assert code == 0 and out == "4\n", (out, err)


def test_piped_stdin_is_the_prompt(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+2?\n"))
    code, out, _ = _doge(capsys, "chat", str(model_dir), "--temperature", "0.5", "--seed", "3")
    assert code == 0 and out == "4\n"


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_doge", "not a Doge"),
    ("no_tokenizer", "no tokenizer"),
    ("no_template", "no chat template"),
    ("bad_flag", "temperature must be at least"),
])
def test_errors_are_one_line_with_exit_2(model_dir, tmp_path, capsys, case, message):
    target = tmp_path / case
    extra = []
    if case == "not_doge":
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    elif case == "no_tokenizer":
        target.mkdir()
        for name in ("config.json", "model.safetensors"):
            (target / name).write_bytes((model_dir / name).read_bytes())
    elif case == "no_template":
        import shutil

        shutil.copytree(model_dir, target)
        (target / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((target / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    elif case == "bad_flag":
        target, extra = model_dir, ["--temperature", "0"]
    code, out, err = _doge(capsys, "chat", str(target), "--prompt", "hi", *extra)
    assert code == 2 and out == ""
    assert err.startswith("doge: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("flags", [["--dtype", "bf16"], ["--dtype", "fp32", "--quantize", "int8", "--device", "cpu"]])
def test_lower_precisions_answer_too(model_dir, capsys, monkeypatch, flags):
    import doge_cli.chat.loading as loading

    loaded = []
    real = loading.load_model_and_tokenizer

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        loaded.append(model)
        return model, tok

    monkeypatch.setattr(loading, "load_model_and_tokenizer", spy)
    code, out, err = _doge(capsys, "chat", str(model_dir), "--prompt", "What is 2+2?", "--greedy", *flags)
    assert code == 0 and out == "4\n", (out, err)  # the forced model's margins survive the rounding
    assert loading.describe_precision(loaded[0]) == ("bf16" if "bf16" in flags else "int8")
