"""Tiny chat tokenizer and a Doge whose greedy output is forced, built in-process for chat and eval tests.

The forced model embeds each token as a one-hot vector, its blocks add nothing (o_proj and down_proj
are zero), and its LM head maps token t to the logit of ``chain[t]`` only (every other token leads
to end-of-turn). So whatever the prompt, the reply is the chain that starts at the prompt's last
token: a known answer to test against, with finite log-probabilities everywhere.
"""

from __future__ import annotations

from pathlib import Path

GAP = 20.0  # logit margin of the forced token: greedy and T=0.8 sampling both pick it


def make_chat_tokenizer(path: Path, vocab_size: int = 320):
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from doge_cli.chat_format import BOS, CHAT_TEMPLATE, EOT, PAD, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for t in topics.values() if len(t) > 200][:120], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def forced_model(tok, chain: dict[int, int], hidden: int = 320):
    """A DogeForCausalLM (ours) whose next token after ``t`` is ``chain.get(t, eos)``."""
    import torch
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM

    vocab = len(tok)
    assert vocab <= hidden
    config = DogeConfig(vocab_size=hidden, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                        keep_window_size=512, tie_word_embeddings=False, router_aux_loss_coef=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = DogeForCausalLM(config, attn_implementation="sdpa")
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(hidden))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(hidden, hidden)
        scale = GAP / hidden**0.5  # the final RMSNorm scales a one-hot vector by sqrt(hidden)
        for t in range(hidden):
            head[chain.get(t, tok.eos_token_id), t] = scale
        model.lm_head.weight.copy_(head)
    return model.eval()


def save_forced_model(path: Path, tok, chain: dict[int, int]) -> Path:
    from doge_cli.model import save_pretrained

    return save_pretrained(forced_model(tok, chain), path, tokenizer=tok)


def chain_of(ids: list[int]) -> dict[int, int]:
    """``{ids[0]: ids[1], ids[1]: ids[2], ...}``; the ids must be distinct so the chain ends."""
    assert len(set(ids)) == len(ids), ids
    return dict(zip(ids, ids[1:]))


def single_token(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def save_forced_r1_model(root: Path, thought: str = "the", answer: str = "4") -> Path:
    """A chat model whose every reply is ``<thought> {thought} </thought><solution>{answer}</solution>``."""
    from doge_cli.chat_format import THINKING_TOKENS

    tok = make_chat_tokenizer(root / "tokenizer")
    header = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    last = tok(header, add_special_tokens=False)["input_ids"][-1]
    bt, et, bs, es = tok.convert_tokens_to_ids(list(THINKING_TOKENS))
    chain = chain_of([last, bt, single_token(tok, " " + thought), et, bs, single_token(tok, answer), es])
    return save_forced_model(root / "model", tok, chain)
