"""Streaming deltas are valid UTF-8 and join to the final text, multi-byte characters included."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from doge_cli.inference.streaming import TextStream

TEXT = "naïve café 東京タワー 🐕🦴 — über “quotes” and plain words"


def _byte_level_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["plain words and more plain words"], trainer)  # too small to merge the emoji
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_deltas_join_to_the_final_text_and_never_split_a_character():
    tok = _byte_level_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT)  # multi-byte characters really are split over several tokens
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # held back while a character was incomplete
