"""``doge eval`` from the command line: one real run, --compare, and the one-line errors."""

import json

import pytest

from tests.chat.toymodel import make_chat_tokenizer, save_forced_model
from tests.cli.helpers import run_doge as _doge


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    tok = make_chat_tokenizer(root / "tokenizer")
    model = save_forced_model(root / "model", tok, {})
    folder = root / "datasets" / "eval" / "arithmetic"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                                               for i in range(5)))
    return root, model



def test_eval_writes_json_and_compare_shows_it(setup, capsys):
    root, model = setup
    out_dir = root / "results"
    code, out, err = _doge(capsys, "eval", "--model", str(model), "--tasks", "arithmetic", "--datasets-dir",
                           str(root / "datasets"), "--output-dir", str(out_dir), "--max-samples", "3",
                           "--device", "cpu")
    assert code == 0, err
    files = list(out_dir.glob("*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["max_samples"] == 3 and saved["tasks"]["arithmetic"]["em"] == 0.0  # it always says nothing
    assert "arithmetic" in out and "em" in out
    code, out, _ = _doge(capsys, "eval", "--compare", str(files[0]), "--compare", str(files[0]))
    assert code == 0 and out.count("0.0000") == 2


@pytest.mark.parametrize("args, message", [
    ([], "give --model"),
    (["--model", "MODEL", "--tasks", "base"], "offline"),
    (["--model", "MODEL", "--tasks", "nope"], "unknown task"),
    (["--model", "MODEL", "--datasets-dir", "EMPTY"], "doge data download"),
    (["--model", "ROOT/missing", "--tasks", "arithmetic", "--datasets-dir", "ROOT/datasets"], "does not exist"),
    (["--compare", "ROOT/none.json"], "does not exist"),
])
def test_errors_are_one_line_with_exit_2(setup, capsys, tmp_path, args, message):
    root, model = setup
    args = [a.replace("MODEL", str(model)).replace("EMPTY", str(tmp_path)).replace("ROOT", str(root)) for a in args]
    code, out, err = _doge(capsys, "eval", *args)
    assert code == 2 and err.startswith("doge: error: ") and message in err and err.count("\n") == 1
