"""DogeLightevalModel's scores against transformers' own DogeForCausalLM, on a model that reads its context.

The model here is a small randomly initialised Doge (no zeroed projections, no forced chain): the
next-token distribution really depends on every earlier token, so a wrong history (a misplaced
window, a padding leak, an off-by-one between logits and targets) changes the numbers. Every
expected value is computed by hand from transformers' native ``DogeForCausalLM`` (eager attention,
one unpadded sequence at a time, log-softmax written out), loaded from the folder doge saved.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from doge_cli.eval.lighteval_model import rolling_windows

MAX_LEN = 48  # the model's context: a few hundred characters of text need several rolling windows
ATOL = 1e-4  # on summed log-probabilities, fp32
CONTEXT = "Question: What does the assert statement do in a program?\nAnswer:"


def make_ascii_tokenizer(vocab_size: int = 400):
    """A byte-level BPE over printable ASCII only, with just BOS, end-of-turn and pad as special tokens:
    every token a random model can emit decodes to readable text (no stray UTF-8 fragments, no R1
    markers), so replies and stop sequences are plain strings."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from doge_cli.chat_format import BOS, EOT, PAD

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = [byte_level.pre_tokenize_str(chr(b))[0][0] for b in [10, *range(32, 127)]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOT, PAD], show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    texts = [t for t in topics.values() if len(t) > 200 and t.isascii()][:120]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A random-init Doge saved by doge and loaded back by transformers; the global RNG is left as it was."""
    from transformers import AutoModelForCausalLM, DogeConfig

    from doge_cli.model import DogeForCausalLM, save_pretrained

    root = tmp_path_factory.mktemp("lighteval_model")
    tok = make_ascii_tokenizer()
    # initializer_range 0.2 (not 0.02) makes the logits spread out (std ~1): the distribution moves with
    # the context, and greedy choices win by clear margins instead of near-ties.
    config = DogeConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                        keep_window_size=2048, tie_word_embeddings=False, initializer_range=0.2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20240607)
        model = DogeForCausalLM(config, attn_implementation="sdpa").eval()
    folder = save_pretrained(model, root / "model", tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return SimpleNamespace(tok=tok, model=model, hf=hf, folder=Path(folder))


def wrap(lm, model=None, batch_size: int = 3):
    from doge_cli.eval.lighteval_model import DogeLightevalModel

    return DogeLightevalModel(model or lm.model, lm.tok, name="toy", batch_size=batch_size)


def encode(lm, text: str) -> list[int]:
    return lm.tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def hf_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-softmax of transformers' logits for the single unpadded row ``ids``."""
    logits = lm.hf(torch.tensor([ids])).logits[0].double()
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def hf_score_tail(lm, ids: list[int], n: int) -> tuple[float, bool]:
    """Summed log-prob of the last ``n`` tokens of ``ids`` given everything before them, and whether
    each of them is the argmax."""
    logprobs = hf_logprobs(lm, ids)
    targets = torch.tensor(ids[len(ids) - n:])
    rows = logprobs[len(ids) - n - 1:len(ids) - 1]
    return float(rows.gather(-1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


@torch.no_grad()
def hf_greedy(lm, ids: list[int], max_new: int, stop_ids=()) -> list[int]:
    """Greedy decoding by hand: a full forward pass per step (no cache), stopping after a stop id."""
    out = []
    for _ in range(max_new):
        logits = lm.hf(torch.tensor([ids + out])).logits[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) > 1e-3, "near-tie in the reference: pick another prompt"
        out.append(int(logits.argmax()))
        if out[-1] in stop_ids:
            break
    return out


def mc_doc(query: str, choices: list[str]):
    from lighteval.tasks.requests import Doc

    return Doc(query=query, choices=choices, gold_index=0)


def expected_choice(lm, context: str, choice: str) -> tuple[float, bool, list[int]]:
    """lighteval's split (context and choice encoded together, the choice is what the context's tokens
    do not cover), prefixed with BOS, the row's start cut to the model's context."""
    ctx, whole = encode(lm, context), encode(lm, context + choice)
    assert whole[:len(ctx)] == ctx and len(whole) > len(ctx), "the choice must add tokens after the context's"
    cont = whole[len(ctx):]
    row = ([lm.tok.bos_token_id] + whole)[-MAX_LEN:]
    return (*hf_score_tail(lm, row, len(cont)), cont)


# ------------------------------------------------------------------------------------------ the model


@torch.no_grad()
def test_toy_model_reads_its_context_and_matches_transformers(lm):
    ids = [lm.tok.bos_token_id] + encode(lm, CONTEXT)
    changed = list(ids)
    changed[2] = (changed[2] + 1) % len(lm.tok)
    for model in (lm.model, lm.hf):
        last, last_changed = (model(torch.tensor([x])).logits[0, -1] for x in (ids, changed))
        assert float((last - last_changed).abs().max()) > 0.1  # an early token moves the last prediction
    ours = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    assert torch.allclose(ours, hf_logprobs(lm, ids).float(), atol=1e-5)


# ------------------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_matches_transformers_per_choice(lm):
    """Choices of 1 to 10+ tokens over two contexts, batched with right padding (batch_size 2 splits
    the 6 rows unevenly by length); every sum and greedy flag equals transformers' on the lone row."""
    other = "Question: Which loop runs while a condition holds?\nAnswer:"
    ctx = [lm.tok.bos_token_id] + encode(lm, CONTEXT)
    greedy = hf_greedy(lm, ctx, 3)
    greedy_text = lm.tok.decode(greedy)
    assert encode(lm, CONTEXT + greedy_text)[len(ctx) - 1:] == greedy  # the text re-encodes to those tokens
    docs = [mc_doc(CONTEXT, [" yes", greedy_text, " it raises an error when the condition is false"]),
            mc_doc(other, [" for", " the while statement", " yes"])]
    responses = wrap(lm, batch_size=2).loglikelihood(docs)
    for doc, response in zip(docs, responses):
        for i, choice in enumerate(doc.choices):
            logprob, is_greedy, cont = expected_choice(lm, doc.query, choice)
            assert response.logprobs[i] == pytest.approx(logprob, abs=ATOL), (doc.query, choice)
            assert response.argmax_logits_eq_gold[i] == is_greedy, (doc.query, choice)
            assert list(response.output_tokens[i]) == cont
    assert len({len(c) for c in responses[0].output_tokens}) == 3  # the choices differ in length
    assert responses[0].argmax_logits_eq_gold == [False, True, False]  # the model's own continuation
    # The same choice under another context scores differently: the context is really read.
    assert abs(responses[0].logprobs[0] - responses[1].logprobs[2]) > 0.05


def test_loglikelihood_long_context_keeps_the_choice_and_cuts_the_context_start(lm):
    """A context near the model's length (one row fits) and one past it (the row's start is cut)."""
    from pydoc_data.topics import topics

    near = "Question: " + " ".join(topics["assert"].split()[:12]) + "?\nAnswer:"
    far = "Question: " + " ".join(topics["assert"].split()[:40]) + "?\nAnswer:"
    assert MAX_LEN - 12 < len(encode(lm, near)) + 1 < MAX_LEN < len(encode(lm, far))
    docs = [mc_doc(near, [" yes", " the assert statement"]), mc_doc(far, [" yes", " the assert statement"])]
    responses = wrap(lm).loglikelihood(docs)
    for doc, response in zip(docs, responses):
        for i, choice in enumerate(doc.choices):
            logprob, is_greedy, _ = expected_choice(lm, doc.query, choice)
            assert response.logprobs[i] == pytest.approx(logprob, abs=ATOL), (doc.query[:20], choice)
            assert response.argmax_logits_eq_gold[i] == is_greedy


def test_empty_choice_scores_zero_tokens(lm):
    """log P("" | context) = 0 over no tokens; before the fix lighteval's split handed the context's
    last token over as the "choice" and it was scored (output_tokens had one token)."""
    docs = [mc_doc(CONTEXT, [" yes", "", " no"]), mc_doc(CONTEXT + " ", ["", "yes"])]
    responses = wrap(lm).loglikelihood(docs)
    assert responses[0].logprobs[1] == 0.0 and list(responses[0].output_tokens[1]) == []
    assert responses[0].argmax_logits_eq_gold[1] is True  # no token to miss
    assert responses[1].logprobs[0] == 0.0 and list(responses[1].output_tokens[0]) == []
    for doc, response in zip(docs, responses):  # the other choices are untouched
        for i, choice in enumerate(doc.choices):
            if choice:  # lighteval moves the context's trailing spaces to the front of the choice
                context = doc.query.rstrip()
                logprob, _, _ = expected_choice(lm, context, doc.query[len(context):] + choice)
                assert response.logprobs[i] == pytest.approx(logprob, abs=ATOL)


def test_choice_merged_into_the_context_scores_zero_tokens_not_the_whole_row(lm):
    """``...Answer: ret`` + ``urn`` encodes as ``...Answer: return``: fewer tokens than the context alone,
    so lighteval's split leaves the choice no token. It must score 0, not the whole row (``lp[-0:]``)."""
    context, choice = CONTEXT + " ret", "urn"
    ctx, whole = encode(lm, context), encode(lm, context + choice)
    assert len(whole) < len(ctx)  # the tokenizer really merges across the boundary
    response = wrap(lm).loglikelihood([mc_doc(context, [choice, " yes"])])[0]
    assert list(response.output_tokens[0]) == []
    assert response.logprobs[0] == 0.0 and response.argmax_logits_eq_gold[0] is True
    whole_row, _ = hf_score_tail(lm, [lm.tok.bos_token_id] + whole, len(whole))
    assert whole_row < -10  # what the old slice summed instead


# ---------------------------------------------------------------------------- loglikelihood_rolling


def rolling_reference(lm, seq: list[int]) -> float:
    """Hand-computed rolling score of ``seq`` (BOS first), windows as the module documents them: the first
    window is the first MAX_LEN tokens and scores all but BOS; then each window scores the next
    MAX_LEN // 2 tokens (fewer at the end), fed together with the tokens just before them up to a full
    MAX_LEN, so each sees at least half a context of history. Each window is its own sequence
    (positions from 0) through transformers."""
    total, scored = 0.0, []
    first_end = min(len(seq), MAX_LEN)
    total += hf_score_tail(lm, seq[:first_end], first_end - 1)[0]
    scored += range(1, first_end)
    target = first_end
    while target < len(seq):
        end = min(len(seq), target + MAX_LEN // 2)
        window = seq[max(0, end - MAX_LEN):end]
        assert len(window) - (end - target) >= MAX_LEN // 2  # history before the first scored token
        total += hf_score_tail(lm, window, end - target)[0]
        scored += range(target, end)
        target = end
    assert scored == list(range(1, len(seq)))  # every token after BOS exactly once
    return total


def test_rolling_loglikelihood_over_several_windows_matches_transformers(lm):
    from pydoc_data.topics import topics

    from lighteval.tasks.requests import Doc

    long_text = " ".join(topics["assert"].split()[:90])
    short_text = "The assert statement checks a condition."
    long_seq = [lm.tok.bos_token_id] + encode(lm, long_text)
    short_seq = [lm.tok.bos_token_id] + encode(lm, short_text)
    assert len(long_seq) > 3 * MAX_LEN and len(short_seq) < MAX_LEN
    docs = [Doc(query=long_text, choices=[], gold_index=[]), Doc(query=short_text, choices=[], gold_index=[])]
    responses = wrap(lm, batch_size=4).loglikelihood_rolling(docs)  # windows of both documents share batches
    expected_long = rolling_reference(lm, long_seq)
    assert responses[0].logprobs[0] == pytest.approx(expected_long, abs=ATOL)
    assert responses[0].output_tokens == [[len(long_seq) - 1]]
    # One window: the whole short document scored at once, the first token given BOS only.
    expected_short = hf_score_tail(lm, short_seq, len(short_seq) - 1)[0]
    assert responses[1].logprobs[0] == pytest.approx(expected_short, abs=ATOL)
    assert responses[1].output_tokens == [[len(short_seq) - 1]]
    # The history matters: cutting the long document into disjoint windows scores it differently.
    disjoint = sum(hf_score_tail(lm, [lm.tok.bos_token_id] + long_seq[s:s + MAX_LEN - 1],
                                 len(long_seq[s:s + MAX_LEN - 1]))[0]
                   for s in range(1, len(long_seq), MAX_LEN - 1))
    assert abs(disjoint - expected_long) > 0.5


# -------------------------------------------------------------------------------------- greedy_until


def gen_doc(query: str, size: int, stop: list[str] | None = None):
    from lighteval.tasks.requests import Doc

    return Doc(query=query, choices=[], gold_index=[], generation_size=size, stop_sequences=stop)


def test_greedy_until_matches_a_hand_greedy_loop(lm):
    """Prompts of different lengths in one left-padded batch, each reply the tokens transformers picks
    greedily for the lone prompt, up to ``generation_size`` tokens; a prompt longer than the room left
    (MAX_LEN - generation_size) keeps its last tokens."""
    from pydoc_data.topics import topics

    size = 10
    prompts = [CONTEXT, "Question: Why?\nAnswer:", " ".join(topics["assert"].split()[:60])]
    responses = wrap(lm, batch_size=4).greedy_until([gen_doc(p, size) for p in prompts])
    for prompt, response in zip(prompts, responses):
        ids = ([lm.tok.bos_token_id] + encode(lm, prompt))[-(MAX_LEN - size):]
        tokens = hf_greedy(lm, ids, size, stop_ids=[lm.tok.eos_token_id])
        assert len(tokens) == size and lm.tok.eos_token_id not in tokens
        assert response.text == [lm.tok.decode(tokens)]
        assert list(response.input_tokens) == ids
    assert len(encode(lm, prompts[2])) + 1 > MAX_LEN - size  # the last prompt was cut


def test_greedy_until_stops_at_the_stop_sequence_and_stop_token(lm):
    ids = [lm.tok.bos_token_id] + encode(lm, CONTEXT)
    tokens = hf_greedy(lm, ids, 12)
    full = lm.tok.decode(tokens)
    stop = lm.tok.decode(tokens[4:6])
    assert stop.strip() and full.index(stop) > 0
    response = wrap(lm).greedy_until([gen_doc(CONTEXT, 12, ["\n\n\n", stop])])[0]
    assert response.text == [full[:full.index(stop)]]

    # A stop id ends the reply after that token, which is dropped from the text.
    k = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    model = copy.deepcopy(lm.model)
    model.config.eos_token_id = [lm.tok.eos_token_id, tokens[k]]
    assert lm.model.config.eos_token_id == lm.tok.eos_token_id  # the shared model is untouched
    response = wrap(lm, model).greedy_until([gen_doc(CONTEXT, 12)])[0]
    assert response.text == [lm.tok.decode(tokens[:k])]


@pytest.mark.parametrize("n, max_length", [(1, 8), (2, 8), (8, 8), (9, 8), (30, 8), (31, 7), (100, 2)])
def test_rolling_windows_score_every_token_once_with_history(n, max_length):
    scored = []
    for i, (start, end, first) in enumerate(rolling_windows(n, max_length)):
        assert 0 <= start < first < end <= n and end - start <= max_length
        if i:
            assert first - start >= max_length // 2
        scored += range(first, end)
    assert scored == list(range(1, n))
