"""GRPO: loss against TRL's GRPOTrainer, advantages, rewards, learning, resume, bad input."""

from collections import defaultdict
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from doge_cli.errors import DogeError
from doge_cli.train.objectives.grpo import group_advantages, grpo_loss
from doge_cli.train.objectives.rewards import (
    format_reward,
    resolve_reward,
)

from .chat_fixtures import built_objective, final_weights, metrics, run_stage

FAST = {"grpo.num_generations": 4, "grpo.max_completion_length": 12, "train.global_batch_size": 4,
        "runtime.micro_batch_size": 2}



def objective(data, init, tmp_path, **extra):
    return built_objective("grpo", data, init, tmp_path, **{**FAST, **extra})


def trl_loss(logps, old, ref, advantages, mask, *, loss_type, beta, eps_low, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss with its model call replaced by our per-token log-probs."""
    from trl import GRPOTrainer

    acc = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x, device=logps.device)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=acc, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    b = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(b, 3, dtype=torch.long), "prompt_mask": torch.ones(b, 3, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("grpo", 0.04), ("dr_grpo", 0.04), ("dapo", 0.0),
                                            ("dapo", 0.1)])
def test_loss_equals_trl_on_fixed_completions(loss_type, beta):
    gen = torch.Generator().manual_seed(0)
    b, t = 8, 7
    logps = (-torch.rand(b, t, generator=gen) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(b, t, generator=gen)  # some ratios fall outside the clip range
    ref = logps.detach() + 0.2 * torch.randn(b, t, generator=gen)
    mask = (torch.rand(b, t, generator=gen) > 0.25).long()
    mask[:, 0] = 1
    rewards = torch.rand(b, generator=gen)
    adv = group_advantages(rewards, 4)
    kw = {"loss_type": loss_type, "beta": beta, "eps_low": 0.2, "eps_high": 0.28, "max_len": 9}

    loss_sum, units, stats = grpo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                       max_completion_length=9, beta=beta, ref_logps=ref)
    ours = loss_sum / units
    (ours_grad,) = torch.autograd.grad(ours, logps)
    theirs, logged = trl_loss(logps, old, ref, adv, mask, **kw)
    (theirs_grad,) = torch.autograd.grad(theirs, logps)
    assert torch.allclose(ours, theirs, atol=1e-6), (float(ours), float(theirs))
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-6)
    assert ours_grad.abs().max() > 1e-3
    assert float(stats["clip_ratio"]) == pytest.approx(logged["clip_ratio/region_mean"], abs=1e-6)
    assert 0 < float(stats["clip_ratio"]) < 1
    if beta:
        assert float(stats["kl"]) == pytest.approx(logged["kl"], abs=1e-6)


def test_group_advantages_match_trl_formula():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 3.0])
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    assert torch.allclose(group_advantages(rewards, 4), (rewards - mean) / (std + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, scale=False), rewards - mean)
    assert torch.equal(group_advantages(rewards, 4)[4:8], torch.zeros(4))  # equal rewards: no signal, no NaN


def test_loss_path_through_the_model_equals_trl(grpo_data, chat_root, tmp_path):
    """Rollouts from the real generator, our loss through the model, TRL's loss on the same log-probs."""
    from accelerate import Accelerator

    from doge_cli.model import load_model

    obj = objective(grpo_data, chat_root / "start", tmp_path, **{"grpo.beta": 0.05})
    model = load_model(chat_root / "start", attn_implementation="sdpa").train()
    obj.after_prepare(model, Accelerator(cpu=True))
    part = obj.train_data[:2]
    rows = [{**dict(zip(part, vals)), "_row": i} for i, vals in enumerate(zip(*part.values()))]
    (batch,) = obj.prepare_step(model, [obj.collate(rows)])
    assert batch["input_ids"].shape[0] == 8 and batch["completion_mask"].sum() > 8
    gen = torch.Generator().manual_seed(3)
    batch["advantages"] = torch.randn(8, generator=gen)
    with torch.no_grad():
        batch["old_logps"] = obj._logps(model, batch) + 0.3 * torch.randn(batch["targets"].shape, generator=gen)
    params = list(model.parameters())
    out = obj.loss(model, batch)
    ours = out.loss_sum / obj.count_targets(batch)
    ours_grad = torch.autograd.grad(ours, params)
    logps = obj._logps(model, batch)
    theirs, _ = trl_loss(logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], batch["completion_mask"],
                         loss_type="dapo", beta=0.05, eps_low=0.2, eps_high=0.2, max_len=12)
    theirs_grad = torch.autograd.grad(theirs, params)
    assert torch.allclose(ours, theirs, atol=1e-5)
    for a, b in zip(ours_grad, theirs_grad):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@contextmanager
def rng_kept():
    """transformers' Trainer seeds the global RNGs when built; put them back afterwards."""
    import random

    import numpy as np

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_rollout_mask_and_per_token_logps_equal_trl(grpo_data, chat_root, tmp_path, temperature):
    """Seeded rollouts from doge's generator, replayed through TRL's own GRPO batch building: TRL's
    GRPOTrainer (on transformers' DogeForCausalLM with the same weights and the generation config
    doge exports) tokenizes the prompts, takes the same completions from a stubbed ``generate``, masks
    them after the first EOS and computes the per-token log-probs at the sampling temperature through
    its fused LM head (_generate_and_score_completions with num_iterations=2, which stores them as
    old_per_token_logps). Prompt ids, completion ids, completion mask and log-probs (and their weight
    gradients, via _get_per_token_logps_and_entropies) equal doge's rollout batch."""
    import datasets
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from doge_cli.model import save_pretrained

    g, max_len = 4, 12

    def rollout(seed: int):
        obj = objective(grpo_data, chat_root / "start", tmp_path / f"seed-{seed}", **{
            "grpo.temperature": temperature, "grpo.num_iterations": 2, "train.seed": seed})
        model = obj.build_model()
        stops = model.config.eos_token_id
        assert isinstance(stops, list) and len(stops) == 2  # end-of-turn and end-of-text
        # A random tiny model almost never samples a stop token: raise both stop logits along the mean final
        # hidden state so that some completions end early (with either stop id) and others run to the limit.
        with torch.no_grad():
            ids = torch.randint(6, len(obj.tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
            mean = model(ids, return_hidden_states=True).hidden_states.reshape(-1, model.config.hidden_size).mean(0)
            for stop in stops:
                model.lm_head.weight[stop] += 1.0 * mean / mean.norm() ** 2
        obj.after_prepare(model, Accelerator(cpu=True))
        part = obj.train_data[:2]
        examples = [{**dict(zip(part, vals)), "_row": i} for i, vals in enumerate(zip(*part.values()))]
        (batch,) = obj.prepare_step(model, [obj.collate(examples)])
        return obj, model, stops, examples, batch

    def covers(batch, stops) -> bool:
        """The rollout has completions cut at the limit and completions that stopped early (at T=0.7 with
        each stop id): the cases the comparison must see."""
        mask = batch["completion_mask"]
        lengths = mask.sum(1)
        if mask.shape != (2 * g, max_len) or not ((lengths == max_len).any() and (lengths < max_len).any()):
            return False
        completion = batch["input_ids"][:, batch["prompt_length"]:]
        ends = {int(completion[i, n - 1]) for i, n in enumerate(lengths.tolist()) if n < max_len}
        return temperature != 0.7 or ends == set(stops)

    # Seeded rollouts are reproducible, but a chain of sampled tokens turns on the last bits of the logits,
    # which can differ with the process's earlier history (allocation, and so alignment, inside BLAS): the
    # first train seed whose rollout covers the cases is used (233, the default, did on this machine).
    tried = []
    for seed in (233, 234, 235, 236, 237, 238):
        obj, model, stops, examples, batch = rollout(seed)
        tried.append(batch["completion_mask"].sum(1).tolist())
        if covers(batch, stops):
            break
    else:
        raise AssertionError(f"no seeded rollout covered the cases; completion lengths: {tried}")
    P, mask = batch["prompt_length"], batch["completion_mask"]
    completion = batch["input_ids"][:, P:]

    twin = save_pretrained(model, tmp_path / "twin", tokenizer=obj.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(twin)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2 * g, num_generations=g,
                      max_completion_length=max_len, temperature=temperature, num_iterations=2, use_cpu=True,
                      bf16=False, report_to="none")
    prompts = [{"prompt": e["prompt"], "answer": e["answer"]} for e in examples]
    with rng_kept():
        trainer = GRPOTrainer(model=hf, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                              train_dataset=datasets.Dataset.from_list(prompts), processing_class=obj.tokenizer)
    assert sorted(trainer.eos_token_ids) == sorted(stops) and trainer.temperature == temperature
    seen = {}

    def replay(input_ids, attention_mask, **kwargs):  # TRL's generate call, answered with doge's completions
        seen["input_ids"], seen["attention_mask"] = input_ids, attention_mask
        return torch.cat((input_ids, completion), 1)

    hf.generate = replay
    out = trainer._generate_and_score_completions([p for p in prompts for _ in range(g)])

    # Prompts: TRL's chat-template tokenization, left-padded, equals doge's collate.
    assert torch.equal(seen["input_ids"], batch["input_ids"][:, :P])
    assert torch.equal(out["prompt_ids"], batch["input_ids"][:, :P])
    assert torch.equal(out["prompt_mask"], batch["attention_mask"][:, :P])
    # Completions: TRL keeps the tokens up to and including the first EOS, row by row.
    assert torch.equal(out["completion_ids"], completion)
    for row in range(2 * g):
        assert torch.equal(out["completion_mask"][row], mask[row]), row
    assert torch.equal(batch["targets"], completion.masked_fill(out["completion_mask"] == 0, -100))
    # Per-token log-probs at the sampling temperature: doge's loss path and its stored old log-probs.
    ours = obj._logps(model, batch)
    assert torch.allclose(ours.detach(), out["old_per_token_logps"], atol=1e-5, rtol=0)
    assert torch.allclose(batch["old_logps"], out["old_per_token_logps"], atol=1e-5, rtol=0)
    assert not ours[mask == 0].any() and not out["old_per_token_logps"][mask == 0].any()

    # Gradients of the log-probs through both models (TRL's fused head has its own backward). TRL computes its
    # head in fp32 whatever the model's dtype, so this comparison is in fp32, with a bound derived from the
    # computation rather than tuned: every token's gradient carries rounding of at most ~u·κ of its own size
    # (u = 6e-8 in fp32; κ = 1e3 for the network's depth), so the weighted sum's error is at most
    # 1e-4 · Σ_t |w_t| · |∂logp_t/∂θ| elementwise. A bound on the result's own size failed now and then on
    # a one-element gradient whose token terms cancel.
    theirs, _, _ = trainer._get_per_token_logps_and_entropies(hf, torch.cat((out["prompt_ids"], completion), 1),
                                                             torch.cat((out["prompt_mask"], out["completion_mask"]), 1),
                                                             max_len)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)) * mask
    ours_params, theirs_params = dict(model.named_parameters()), dict(hf.named_parameters())
    names = sorted(ours_params)
    assert names == sorted(theirs_params)
    ours_grad = torch.autograd.grad((ours * weights).sum(), [ours_params[n] for n in names], retain_graph=True)
    theirs_grad = torch.autograd.grad((theirs * weights).sum(), [theirs_params[n] for n in names])
    size = [torch.zeros_like(ours_params[n]) for n in names]
    for i, j in mask.nonzero().tolist():
        per_token = torch.autograd.grad(ours[i, j], [ours_params[n] for n in names], retain_graph=True,
                                        allow_unused=True)
        for total, g in zip(size, per_token):
            if g is not None:
                total += abs(float(weights[i, j])) * g.abs()
    for name, a, b, bound in zip(names, ours_grad, theirs_grad, size):
        excess = ((a - b).abs() - 1e-4 * bound).max()
        assert excess <= 1e-9, (name, float((a - b).abs().max()), float(bound.max()))
    assert any(a.abs().max() > 1e-3 for a in ours_grad)


def user_reward(completions, answers, prompts, **info):
    return [float(len(c)) for c in completions]


def test_user_reward_by_dotted_path_and_unknown_names(grpo_data, chat_root, tmp_path):
    assert resolve_reward(f"{__name__}:user_reward")(["ab", "abc"], ["1", "2"], [[], []]) == [2.0, 3.0]
    with pytest.raises(DogeError, match="unknown reward function 'acuracy'"):
        resolve_reward("acuracy")
    with pytest.raises(DogeError, match="cannot import reward module"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(DogeError, match="unknown reward function") as err:
        objective(grpo_data, chat_root / "start", tmp_path, **{"grpo.rewards": "[{name: lenght}]"})
    assert "\n" not in str(err.value)


def test_prompts_longer_than_the_limit_keep_their_last_tokens(grpo_data, chat_root, tmp_path, capsys):
    obj = objective(grpo_data, chat_root / "start", tmp_path, **{"grpo.max_prompt_length": 16})
    assert "longer than grpo.max_prompt_length=16" in capsys.readouterr().out
    rows = [dict(zip(obj.train_data[:3], v)) for v in zip(*obj.train_data[:3].values())]
    full = obj.tokenizer.apply_chat_template([r["prompt"] for r in rows], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
    batch = obj.collate(rows)
    assert batch["prompt_ids"].shape[1] == 16
    for row, ids in enumerate(full):
        assert batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist() == ids[-16:]


def test_every_prompt_of_an_epoch_is_used_with_several_iterations():
    """num_iterations = 2: each batch of prompts serves two optimizer steps and the data then moves on,
    as TRL does, so an epoch visits every row once (before, half of them were skipped)."""
    from types import SimpleNamespace

    from doge_cli.train.core import StepBatches

    rows = list(range(12))
    obj = SimpleNamespace(steps_per_batch=2, train_data=rows)
    source = StepBatches(obj, micro=2, accum=1, world=2, rank=0, seed=1, start=0, end=12)
    other = StepBatches(obj, micro=2, accum=1, world=2, rank=1, seed=1, start=0, end=12)
    per_step = [source.rows(s, 0, 12) + other.rows(s, 0, 12) for s in range(6)]
    assert per_step[0] == per_step[1] and per_step[2] == per_step[3] and per_step[4] == per_step[5]
    assert sorted(sum(per_step[::2], [])) == rows


def mean_format_reward(model_dir, obj, n=24):
    from doge_cli.inference import generate
    from doge_cli.model import load_model

    model = load_model(model_dir, attn_implementation="sdpa")
    data = obj.train_data  # the caller passes the held-out prompts as this objective's data
    batch = obj.collate([dict(zip(data[:n], v)) for v in zip(*data[:n].values())])
    gen = torch.Generator().manual_seed(123)
    out = generate(model, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=12, do_sample=True,
                   num_return_sequences=4, generator=gen, pad_token_id=obj.tokenizer.pad_token_id)
    texts = [obj.tokenizer.decode(r[:n_]) for r, n_ in zip(out.new_tokens.tolist(), out.lengths.tolist())]
    return sum(format_reward(texts)) / len(texts)


def test_grpo_raises_held_out_format_reward(chat_root, tok, tmp_path):
    """A random tiny model emits the thinking tags only by chance; GRPO on the format reward makes them likelier.
    Prompts without the long R1 system prompt keep this fast on CPU."""
    import datasets

    from doge_cli.data.builtin import builtin_dataset
    from doge_cli.data.tokenization import prepare_grpo

    from .chat_fixtures import save

    ds = prepare_grpo(builtin_dataset("math-grpo", max_examples=160), tok, 256, system=None)
    data = save(datasets.DatasetDict({"train": ds.select(range(40, len(ds)))}), tmp_path / "short", chat_root / "tokenizer")
    held = save(datasets.DatasetDict({"train": ds.select(range(40))}), tmp_path / "held", chat_root / "tokenizer")
    result = run_stage("grpo", data, tmp_path / "run", chat_root / "start", steps=20,
                       **{**FAST, "grpo.rewards": "[{name: format}]", "optim.lr": 1e-2, "train.global_batch_size": 8,
                          "runtime.micro_batch_size": 8, "grpo.num_generations": 8})
    obj = objective(held, chat_root / "start", tmp_path)
    before, after = mean_format_reward(chat_root / "start", obj), mean_format_reward(result.final_dir, obj)
    print(f"held-out format reward {before:.4f} -> {after:.4f}")
    assert after > before + 0.02, (before, after)
    logged = metrics(tmp_path / "run")[-1]
    assert {"rewards/format/mean", "rewards/format/std", "completions/mean_length", "clip_ratio"} <= set(logged)


@pytest.mark.parametrize("iterations,optimizer", [(1, "adamw"), (2, "adamw"), (2, "muon")])
def test_grpo_resume_equals_straight_run(grpo_data, chat_root, tmp_path, iterations, optimizer):
    extra = {**FAST, "grpo.num_iterations": iterations, "grpo.beta": 0.04, "optim.name": optimizer}
    run_stage("grpo", grpo_data, tmp_path / "straight", chat_root / "start", steps=4, **extra)
    # stop after step 3: with two iterations the resumed step reuses step 2's stored rollouts
    run_stage("grpo", grpo_data, tmp_path / "resumed", chat_root / "start", steps=4, stop_after=3,
              **{**extra, "checkpoint.every": 3})
    run_stage("grpo", grpo_data, tmp_path / "resumed", chat_root / "start", steps=4, resume="auto",
              **{**extra, "checkpoint.every": 3})
    a_log, b_log = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["loss"] for m in a_log] == [m["loss"] for m in b_log]
    assert [m["reward"] for m in a_log] == [m["reward"] for m in b_log]
    a, b = final_weights(tmp_path / "straight" / "final"), final_weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_zero3_matches_one_process(grpo_data, chat_root, tmp_path):
    """ZeRO-3 gathers weights inside every forward, so rollouts of processes whose completions end at
    different lengths must keep stepping together; the run finishes and equals one process (rollouts
    are seeded per micro-batch, not per process)."""
    from ..conftest import launch_train
    from .chat_fixtures import overrides

    runs = {}
    extra = {**FAST, "grpo.max_completion_length": 16, "logging.sample_every": 2}
    for name, launcher in (("one", None), ("two", "zero3.yaml")):
        out = tmp_path / name
        stdout, runs[name] = launch_train("grpo", overrides(grpo_data, out, chat_root / "start", steps=2, **extra),
                                          out, launcher)
        if launcher:
            assert "x 2 processes" in stdout, stdout
    for key in ("loss", "reward", "completions/mean_length"):
        assert [r[key] for r in runs["two"]] == pytest.approx([r[key] for r in runs["one"]], rel=1e-4, abs=1e-6), key
    assert runs["two"][-1]["sample"] == runs["one"][-1]["sample"]


def test_rollout_files_are_never_unpickled(grpo_data, chat_root, tmp_path):
    """RUN/rollouts/*.pt are read with weights_only=True: a file that would run code when unpickled is
    refused in one line (and the code does not run)."""
    import pickle

    from accelerate import Accelerator

    obj = objective(grpo_data, chat_root / "start", tmp_path, **{"grpo.num_iterations": 2})
    obj.after_prepare(obj.build_model(), Accelerator(cpu=True))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = obj._rollout_path(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps([{"x": Payload()}]))
    with pytest.raises(DogeError, match="damaged or not doge's"):
        obj._load_rollouts(0)
    assert not marker.exists()
