"""A unigram baseline for held-out perplexity, in the same units lighteval reports.

Decision: the unigram distribution is fitted on the held-out text itself (the model's tokenizer,
add-one smoothing over the whole vocabulary). Fitted in-sample, it is an optimistic baseline — it
has seen the test tokens' frequencies — so a model that beats it has learned more than which
tokens are common. It needs no training corpus at evaluation time.
"""

from __future__ import annotations

import math
import re
from collections import Counter


def count_units(text: str) -> tuple[int, int]:
    """(words, bytes) of ``text``, counted as lighteval's perplexity metrics count them."""
    return len(re.split(r"\s+", text)), len(text.encode("utf-8"))


def perplexities(logprob: float, words: int, n_bytes: int) -> dict:
    """lighteval's word_perplexity, byte_perplexity and bits_per_byte for a total log-probability (nats)."""
    return {
        "word_perplexity": math.exp(-logprob / words),
        "byte_perplexity": math.exp(-logprob / n_bytes),
        "bits_per_byte": -logprob / n_bytes / math.log(2),
    }


def unigram_baseline(token_ids: list[list[int]], texts: list[str], vocab_size: int) -> dict:
    """Perplexities of an add-one smoothed unigram model fitted on ``token_ids`` (the tokens of ``texts``).

    p(t) = (count(t) + 1) / (N + V), N the number of tokens, V ``vocab_size``.
    """
    counts = Counter(t for ids in token_ids for t in ids)
    total = sum(counts.values())
    denominator = math.log(total + vocab_size)
    logprob = sum(c * (math.log(c + 1) - denominator) for c in counts.values())
    words = n_bytes = 0
    for text in texts:
        w, b = count_units(text)
        words, n_bytes = words + w, n_bytes + b
    result = perplexities(logprob, words, n_bytes)
    result.update(token_perplexity=math.exp(-logprob / total), tokens=total)
    return result
