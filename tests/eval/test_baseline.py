"""The unigram perplexity baseline, by hand."""

import math

import pytest

from doge_cli.eval.baseline import unigram_baseline


def test_unigram_baseline_by_hand():
    # tokens a a b, vocabulary 4: p(a) = 3/7, p(b) = 2/7
    result = unigram_baseline([[0, 0, 1]], ["x y"], vocab_size=4)
    logprob = 2 * math.log(3 / 7) + math.log(2 / 7)
    assert result["bits_per_byte"] == pytest.approx(-logprob / 3 / math.log(2))
    assert result["word_perplexity"] == pytest.approx(math.exp(-logprob / 2))
    assert result["token_perplexity"] == pytest.approx(math.exp(-logprob / 3)) and result["tokens"] == 3
