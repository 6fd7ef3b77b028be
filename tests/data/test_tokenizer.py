import pytest

from doge_cli.chat_format import THINKING_TOKENS
from doge_cli.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from doge_cli.errors import DogeError


def test_trained_tokenizer_loads_with_autotokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.eos_token == "<|eot_id|>" and tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.bos_token == "<|begin_of_text|>" and tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= 600
    for t in THINKING_TOKENS:
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    text = "In the beginning, 12 + 7 = 19."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_marks_exactly_the_assistant_replies(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    text = tok.decode(out["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    kept = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert kept == "4<|eot_id|>It is 6.<|eot_id|>"
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_retrain_from_existing_tokenizer(quick_dir, tokenizer_dir, tmp_path):
    info = train_tokenizer(tmp_path / "tok2", datasets_dir=quick_dir, vocab_size=400, base=str(tokenizer_dir))
    tok = load_tokenizer(str(tmp_path / "tok2"))
    assert info["vocab_size"] == len(tok) <= 400 + 20
    assert tok.eos_token == "<|eot_id|>" and "generation" in tok.chat_template
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(load_tokenizer(str(tokenizer_dir)))


def test_unknown_and_offline_tokenizers_are_user_errors(tmp_path):
    with pytest.raises(DogeError, match="unknown tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(DogeError, match="offline"):
        load_tokenizer("SmallDoge/Doge-tokenizer")
    with pytest.raises(DogeError, match="no datasets"):
        train_tokenizer(tmp_path / "t", datasets_dir=tmp_path / "empty", vocab_size=500)
    assert not (tmp_path / "t").exists()


def test_out_that_is_a_file_or_foreign_folder_is_refused_before_training(quick_dir, tmp_path):
    from doge_cli.data.tokenizer import train_tokenizer
    from doge_cli.errors import DogeError

    afile = tmp_path / "tok.txt"
    afile.write_text("mine")
    with pytest.raises(DogeError, match="not a folder doge wrote"):
        train_tokenizer(afile, datasets_dir=quick_dir, vocab_size=400)
    assert afile.read_text() == "mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("mine")
    with pytest.raises(DogeError, match="did not write"):
        train_tokenizer(foreign, datasets_dir=quick_dir, vocab_size=400)
    assert [p.name for p in foreign.iterdir()] == ["a.txt"]
    with pytest.raises(DogeError, match="--vocab-size"):
        train_tokenizer(tmp_path / "huge", datasets_dir=quick_dir, vocab_size=10**9)
