"""Stage tasks (doge_cli.eval.stages) against independent computations: log-probabilities from
transformers' own Doge with a plain log-softmax, TRL's DPO reward metrics, the reward functions on a
model whose replies are known, and hand-written standard errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from doge_cli.errors import DogeError
from doge_cli.eval.stages import run_stage_task
from tests.chat.toymodel import make_chat_tokenizer, save_forced_r1_model


def tiny_model(tok, seed: int):
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM

    config = DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                        keep_window_size=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = DogeForCausalLM(config)
    with torch.no_grad():  # larger weights than the init, so log-probabilities differ between replies
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from doge_cli.model import save_pretrained

    root = tmp_path_factory.mktemp("stages")
    tok = make_chat_tokenizer(root / "tokenizer")
    policy, reference = (save_pretrained(tiny_model(tok, s), root / name, tokenizer=tok)
                         for s, name in ((1, "policy"), (2, "reference")))
    return {"root": root, "tok": tok, "policy": policy, "reference": reference}


def save_split(path, rows: dict[str, list]):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}) \
        .save_to_disk(str(path))


def hf_reply_logps(folder, pairs):
    """Summed log p(reply | prompt) from transformers' DogeForCausalLM, one pair at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    out = []
    for prompt, reply in pairs:
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(reply)))
    return out


def load(folder):
    from doge_cli.chat.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(str(folder), device="cpu")


def sem(values):
    n, mean = len(values), sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def test_preference_accuracy_and_margins_match_transformers(env, tmp_path):
    gen = torch.Generator().manual_seed(0)
    n = 12

    def ids(lo, hi):
        return torch.randint(10, len(env["tok"]), (int(torch.randint(lo, hi, (1,), generator=gen)),),
                             generator=gen).tolist()

    rows = {"prompt_input_ids": [ids(3, 9) for _ in range(n)], "chosen_input_ids": [ids(2, 7) for _ in range(n)],
            "rejected_input_ids": [ids(2, 7) for _ in range(n)]}
    save_split(tmp_path / "merged" / "dpo", rows)
    lm, tok = load(env["policy"])
    ref, _ = load(env["reference"])
    got = run_stage_task("preference", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=5, reference=ref)

    chosen = list(zip(rows["prompt_input_ids"], rows["chosen_input_ids"]))
    rejected = list(zip(rows["prompt_input_ids"], rows["rejected_input_ids"]))
    pc, pr = hf_reply_logps(env["policy"], chosen), hf_reply_logps(env["policy"], rejected)
    rc, rr = hf_reply_logps(env["reference"], chosen), hf_reply_logps(env["reference"], rejected)
    diff = [c - r for c, r in zip(pc, pr)]
    # DPO's implicit reward beta * log(p / p_ref): chosen beats rejected for any beta > 0 (TRL's rewards/accuracies)
    reward = [(c - cr) - (r - rr_) for c, r, cr, rr_ in zip(pc, pr, rc, rr)]
    acc = [float(d > 0) for d in diff]
    assert 0 < sum(acc) < n  # both outcomes occur, so the test can tell a flipped sign
    assert got["samples"] == n
    assert got["accuracy"] == pytest.approx(sum(acc) / n) and got["accuracy_stderr"] == pytest.approx(sem(acc))
    assert got["margin"] == pytest.approx(sum(diff) / n, abs=1e-4)
    assert got["margin_stderr"] == pytest.approx(sem(diff), rel=1e-4)
    assert got["reward_accuracy"] == pytest.approx(sum(x > 0 for x in reward) / n)
    assert got["reward_margin"] == pytest.approx(sum(reward) / n, abs=1e-4)
    # TRL's DPO on the same pairs (its model call replaced by these summed log-probabilities): its logged
    # rewards/accuracies and rewards/margins / beta are the implicit-reward figures
    from tests.train.objectives.test_dpo import trl_loss

    beta = 0.1
    per_token = torch.zeros(2 * n, 2, dtype=torch.float64)
    per_token[:, 0] = torch.tensor(pc + pr, dtype=torch.float64)
    batch = {"input_ids": torch.zeros(2 * n, 2, dtype=torch.long), "attention_mask": torch.ones(2 * n, 2),
             "targets": torch.tensor([[1, -100]] * (2 * n))}
    _, logged = trl_loss(per_token, batch, torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64),
                         beta=beta, loss_type="sigmoid")
    assert got["reward_accuracy"] == pytest.approx(logged["rewards/accuracies"])
    assert got["reward_margin"] == pytest.approx(logged["rewards/margins"] / beta, abs=1e-4)
    alone = run_stage_task("preference", lm, tok, datasets_dir=tmp_path, max_samples=4, batch_size=8)
    assert alone["samples"] == 4 and "reward_accuracy" not in alone


def test_sft_loss_and_its_stderr(env, tmp_path):
    from doge_cli.eval.sft_loss import assistant_token_loss

    tok = env["tok"]
    gen = torch.Generator().manual_seed(1)
    rows = {"input_ids": [], "labels": []}
    for _ in range(9):
        ids = torch.randint(10, len(tok), (int(torch.randint(6, 14, (1,), generator=gen)),), generator=gen).tolist()
        cut = len(ids) // 2
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * cut + ids[cut:])
    save_split(tmp_path / "merged" / "sft", rows)
    lm, _ = load(env["policy"])
    got = run_stage_task("sft-loss", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=4)
    whole = assistant_token_loss(str(env["policy"]), str(tmp_path / "merged" / "sft"))
    assert got["loss"] == pytest.approx(whole["loss"], rel=1e-5) and got["tokens"] == whole["tokens"]
    # per-row sums of -log p of the labelled tokens, then the ratio estimator's standard error by hand
    sums, counts = [], []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        first = labels.index(next(x for x in labels if x != -100))
        sums.append(-hf_reply_logps(env["policy"], [(ids[:first], ids[first:])])[0])
        counts.append(len(ids) - first)
    ratio = sum(sums) / sum(counts)
    assert got["loss"] == pytest.approx(ratio, rel=1e-4)
    k = len(sums)
    expected = math.sqrt(k / (k - 1) * sum((s - ratio * c) ** 2 for s, c in zip(sums, counts))) / sum(counts)
    assert got["loss_stderr"] == pytest.approx(expected, rel=1e-3)


def test_chat_mc_scores_replies_in_the_chat_format(env, tmp_path):
    tok = env["tok"]
    choices = [["yes", "no", "it is the one that was asked for", "maybe so"],
               ["a much longer answer than the others", "ok", "fine", "sure thing"],
               ["x", "the quick brown fox", "no", "yes indeed"]]
    rows = [{"question": f"Question number {i}?", "choices": c, "label": i % 4} for i, c in enumerate(choices)]
    (tmp_path / "eval" / "chatterbot-mc").mkdir(parents=True)
    (tmp_path / "eval" / "chatterbot-mc" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm, _ = load(env["policy"])
    got = run_stage_task("chat-mc", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=3)
    acc, acc_norm = [], []
    for row in rows:
        messages = [{"role": "user", "content": row["question"]}]
        head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok(head, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": choice}], tokenize=False)
            reply = tok(full[len(head):], add_special_tokens=False)["input_ids"]
            scores.append(hf_reply_logps(env["policy"], [(prompt, reply)])[0])
        norm = [s / len(c) for s, c in zip(scores, row["choices"])]
        acc.append(float(scores.index(max(scores)) == row["label"]))
        acc_norm.append(float(norm.index(max(norm)) == row["label"]))
    assert got["samples"] == 3
    assert got["acc"] == pytest.approx(sum(acc) / 3) and got["acc_norm"] == pytest.approx(sum(acc_norm) / 3)


def test_math_reward_uses_the_grpo_reward_functions(tmp_path):
    from doge_cli.train.objectives.rewards import accuracy_reward, format_reward

    model = save_forced_r1_model(tmp_path / "r1", thought="the", answer="4")
    lm, tok = load(model)
    answers = ["4", "5", "4", "2+2", "4.0"]
    prompts = [[{"role": "system", "content": "Think first."}, {"role": "user", "content": f"What is {a}?"}]
               for a in answers]
    save_split(tmp_path / "data" / "merged" / "grpo", {"prompt": prompts, "answer": answers})
    got = run_stage_task("math-reward", lm, tok, datasets_dir=tmp_path / "data", max_samples=None, batch_size=2)
    reply = "<|begin_of_thought|> the<|end_of_thought|><|begin_of_solution|>4<|end_of_solution|>"
    fmt, acc = format_reward([reply] * 5), accuracy_reward([reply] * 5, answers)
    assert fmt == [1.0] * 5 and acc == [1.0, 0.0, 1.0, 0.0, 1.0]  # the reward functions' own verdicts
    for suffix in ("", "_sampled"):
        assert got[f"format{suffix}"] == 1.0 and got[f"accuracy{suffix}"] == pytest.approx(0.6)
        assert got[f"reward{suffix}"] == pytest.approx(1.6)
        assert got[f"accuracy{suffix}_stderr"] == pytest.approx(sem(acc))
    assert got["samples"] == 5
    with pytest.raises(DogeError, match="--max-new-tokens 600 leaves no room for a prompt in the model's 512-token"):
        run_stage_task("math-reward", lm, tok, datasets_dir=tmp_path / "data", max_samples=None, batch_size=2,
                       max_new_tokens=600)


def test_missing_data_and_another_tokenizer_are_one_line_errors(env, tmp_path):
    lm, tok = load(env["policy"])
    with pytest.raises(DogeError, match=r"needs the held-out split of .*merged/dpo; run `doge data merge --stage dpo"):
        run_stage_task("preference", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=2)
    save_split(tmp_path / "merged" / "sft", {"input_ids": [[5, 6, 10_000]], "labels": [[-100, 6, 10_000]]})
    with pytest.raises(DogeError, match="token id 10000 but the model's vocabulary has"):
        run_stage_task("sft-loss", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=2)
    other = make_chat_tokenizer(tmp_path / "other", vocab_size=300)
    (tmp_path / "merged" / "sft" / "manifest.json").write_text(json.dumps({"tokenizer": str(tmp_path / "other")}))
    assert len(other) != len(tok)
    with pytest.raises(DogeError, match="was tokenized with .*other, whose vocabulary differs"):
        run_stage_task("sft-loss", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=2)


def test_math_reward_fits_its_replies_into_a_short_context(env, tmp_path):
    """A model with a 256-token context: the default 256-token replies are capped at half of it (said
    once) instead of failing after the other tasks ran; an explicit length that leaves no room for a
    prompt is refused before any task runs."""
    from doge_cli.eval.run import evaluate

    prompts = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(3)]
    save_split(tmp_path / "merged" / "grpo", {"prompt": prompts, "answer": [str(i + 1) for i in range(3)]})
    said: list[str] = []
    results = evaluate(str(env["policy"]), tasks=["math-reward"], datasets_dir=tmp_path, output_dir=None,
                       device="cpu", log=said.append)
    assert results["tasks"]["math-reward"]["samples"] == 3
    assert [m for m in said if "capped" in m] == [
        "math-reward replies are capped at 128 new tokens, half the model's 256-token context (--max-new-tokens "
        "to choose)"]
    again: list[str] = []
    with pytest.raises(DogeError, match=r"--max-new-tokens 300 leaves no room .* ask for at most 128"):
        evaluate(str(env["policy"]), tasks=["sft-loss", "math-reward"], datasets_dir=tmp_path, output_dir=None,
                 device="cpu", max_new_tokens=300, log=again.append)
    assert again and not any(m.startswith("running") for m in again)  # nothing ran before the refusal


def test_what_does_not_fit_the_context_is_said_and_counted(env, tmp_path):
    """preference pairs longer than the context are scored on their ends (said once, counted); math-reward
    prompts with no room for a reply are left out (said, counted), never cut to lose their system prompt."""
    lm, tok = load(env["policy"])
    limit = lm.config.max_position_embeddings
    rows = {"prompt_input_ids": [[11] * 5, [12] * (limit - 3), [13] * 4],
            "chosen_input_ids": [[20] * 3, [21] * 6, [22] * 2], "rejected_input_ids": [[30] * 2, [31] * 2, [32] * 3]}
    save_split(tmp_path / "merged" / "dpo", rows)
    said: list[str] = []
    got = run_stage_task("preference", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=2, log=said.append)
    assert got["truncated"] == 1 and got["samples"] == 3
    assert said == [f"preference: 1 of 6 prompt-reply sequences are longer than the model's {limit}-token context; "
                    "they are scored on their last tokens (the prompt's start cut off)"]
    long_question = "seven " * 200
    prompts = [[{"role": "system", "content": "Think."}, {"role": "user", "content": q}]
               for q in ("1 + 1?", long_question, "2 + 2?")]
    save_split(tmp_path / "merged" / "grpo", {"prompt": prompts, "answer": ["2", "x", "4"]})
    said.clear()
    got = run_stage_task("math-reward", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=2,
                         max_new_tokens=8, log=said.append)
    assert got["samples"] == 2 and got["skipped"] == 1
    assert len(said) == 1 and said[0].startswith("math-reward: 1 of 3 prompts are longer than the")
    save_split(tmp_path / "merged" / "grpo", {"prompt": prompts[1:2], "answer": ["x"]})
    with pytest.raises(DogeError, match="every prompt is longer than"):
        run_stage_task("math-reward", lm, tok, datasets_dir=tmp_path, max_samples=None, batch_size=2, max_new_tokens=8)


def test_math_reward_sampled_figures_come_from_sampling(tmp_path):
    """A model that, after its thinking, answers "4" or "5" with equal probability: greedy answers the same
    for every prompt (accuracy 0 or 1, no spread), sampled replies differ (accuracy strictly between, with a
    standard error). A sampled pass that decoded greedily would fail here."""
    from doge_cli.chat_format import THINKING_TOKENS
    from doge_cli.model import save_pretrained
    from tests.chat.toymodel import GAP, chain_of, forced_model, single_token

    tok = make_chat_tokenizer(tmp_path / "tokenizer")
    header = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    last = tok(header, add_special_tokens=False)["input_ids"][-1]
    bt, et, bs, es = tok.convert_tokens_to_ids(list(THINKING_TOKENS))
    four, five = single_token(tok, "4"), single_token(tok, "5")
    model = forced_model(tok, chain_of([last, bt, single_token(tok, " the"), et, bs, four, es]))
    with torch.no_grad():  # the fork: after the solution's start, "5" as likely as "4"; both then end it
        scale = model.lm_head.weight[four, bs].clone()
        model.lm_head.weight[five, bs] = scale
        model.lm_head.weight[tok.eos_token_id, five] = 0.0
        model.lm_head.weight[es, five] = GAP / model.config.hidden_size**0.5
    lm, tok = load(save_pretrained(model, tmp_path / "fork", tokenizer=tok))
    prompts = [[{"role": "user", "content": f"Question {i}: what is 2 + 2?"}] for i in range(8)]
    save_split(tmp_path / "data" / "merged" / "grpo", {"prompt": prompts, "answer": ["4"] * 8})
    got = run_stage_task("math-reward", lm, tok, datasets_dir=tmp_path / "data", max_samples=None, batch_size=4)
    assert got["accuracy"] in (0.0, 1.0) and got["accuracy_stderr"] == 0.0  # greedy: one answer for all
    assert got["format"] == got["format_sampled"] == 1.0  # every reply, sampled or not, is well formed
    assert 0.0 < got["accuracy_sampled"] < 1.0 and got["accuracy_sampled_stderr"] > 0.0
