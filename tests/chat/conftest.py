"""A forced R1-style chat model: every reply is ``<thought> the </thought><solution>4</solution>``."""

import pytest

from doge_cli.data.schema import THINKING_TOKENS

from .toymodel import chain_of, make_chat_tokenizer, save_forced_model, single_token

THOUGHT, ANSWER = "the", "4"


@pytest.fixture(scope="session")
def r1_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = make_chat_tokenizer(root / "tokenizer")
    header = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    last = tok(header, add_special_tokens=False)["input_ids"][-1]
    bt, et, bs, es = tok.convert_tokens_to_ids(list(THINKING_TOKENS))
    chain = chain_of([last, bt, single_token(tok, " " + THOUGHT), et, bs, single_token(tok, ANSWER), es])
    return save_forced_model(root / "model", tok, chain)
