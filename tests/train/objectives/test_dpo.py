"""DPO: the loss and its gradients against TRL's DPOTrainer, learning, resume, bad data."""

from collections import defaultdict
from types import SimpleNamespace

import datasets
import pytest
import torch

from doge_cli.config import resolve_config
from doge_cli.errors import DogeError

from ..conftest import launch_train
from .chat_fixtures import built_objective, final_weights, metrics, overrides, rows, run_stage


def objective(data, init, tmp_path, **extra):
    return built_objective("dpo", data, init, tmp_path, **extra)


def trl_loss(per_token_logps, batch, ref_chosen, ref_rejected, *, beta, loss_type):
    """TRL's DPOTrainer._compute_loss on our per-token log-probs (its model call replaced by them)."""
    from trl import DPOTrainer

    logps = per_token_logps[:, :-1]  # TRL scores T - 1 shifted positions
    completion_mask = torch.zeros_like(batch["targets"])
    completion_mask[:, 1:] = (batch["targets"][:, :-1] != -100).long()
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                              is_top1=torch.zeros_like(logps, dtype=torch.bool), aux_loss=None)
    stub = trl_stub(beta=beta, loss_type=loss_type)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def trl_stub(*, beta, loss_type):
    """The DPOTrainer attributes _compute_loss reads, for one CPU process and a precomputed reference."""
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           use_weighting=False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_gradients_equal_trl(dpo_data, chat_root, tmp_path, loss_type):
    from doge_cli.model import load_model
    from doge_cli.train.objectives.lm import token_logprobs

    beta = 0.3
    obj = objective(dpo_data, chat_root / "start", tmp_path, **{"dpo.beta": beta, "dpo.loss_type": loss_type})
    model = load_model(chat_root / "start", attn_implementation="sdpa").train()
    batch = obj.collate(rows(obj.train_data, [0, 1, 2, 3, 4, 5]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        chosen, rejected = obj._sequence_logps(model, batch)
    # a reference that differs from the policy, so the loss is not at its starting point
    ref = torch.stack((chosen + torch.randn(6, generator=gen), rejected + torch.randn(6, generator=gen)), 1)
    obj.ref_logps["train"] = torch.zeros(len(obj.train_data), 2)
    obj.ref_logps["train"][:6] = ref
    params = [p for p in model.parameters() if p.requires_grad]

    out = obj.loss(model, batch)
    ours = out.loss_sum / obj.count_targets(batch)
    ours_grad = torch.autograd.grad(ours, params)

    per_token = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["targets"])
    theirs, logged = trl_loss(per_token, batch, ref[:, 0], ref[:, 1], beta=beta, loss_type=loss_type)
    theirs_grad = torch.autograd.grad(theirs, params)

    assert float(ours.detach()) > 0
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (float(ours), float(theirs))
    for a, b in zip(ours_grad, theirs_grad):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert any(a.abs().max() > 1e-4 for a in ours_grad)
    n = obj.count_targets(batch)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert float(out.metrics[key]) / n == pytest.approx(logged[key], abs=1e-5), key


def test_reply_spans_and_per_token_logps_equal_trls_concatenated_forward(dpo_data, chat_root, tmp_path):
    """TRL's own preference path on the same pairs and weights: DataCollatorForPreference builds the
    [chosen; rejected] batch and its completion mask, and the concatenated forward of
    DPOTrainer.compute_ref_log_probs (reference) and DPOTrainer._compute_loss (policy) runs
    transformers' DogeForCausalLM through TRL's fused LM head. Its reply positions, per-token and
    summed log-probabilities, loss and weight gradients equal doge's."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from doge_cli.model import load_model
    from doge_cli.train.objectives.lm import token_logprobs

    beta = 0.3
    obj = objective(dpo_data, chat_root / "start", tmp_path, **{"dpo.beta": beta})
    picked = rows(obj.train_data, [0, 1, 2, 3, 4, 5])
    pairs = [obj.truncate(r["prompt_input_ids"], r["chosen_input_ids"], r["rejected_input_ids"]) for r in picked]
    # prompts of several lengths, and pairs whose replies differ in length (padding inside the batch)
    assert len({len(p) for p, _, _ in pairs}) > 2 and sum(len(c) != len(r) for _, c, r in pairs) >= 2
    batch = obj.collate(picked)
    ours_model = load_model(chat_root / "start", attn_implementation="sdpa").eval()
    ours = token_logprobs(ours_model, batch["input_ids"], batch["attention_mask"], batch["targets"])
    with torch.no_grad():
        chosen, rejected = obj._sequence_logps(ours_model, batch)

    hf = AutoModelForCausalLM.from_pretrained(chat_root / "start").eval()
    assert type(hf).__name__ == "DogeForCausalLM"
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer.__init__ does
    forwards = []
    fused = hf.forward
    hf.forward = lambda *a, **k: forwards.append(fused(*a, **k)) or forwards[-1]
    inputs = DataCollatorForPreference(pad_token_id=obj.tokenizer.pad_token_id)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    ref_stub = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext),
                               model=hf, ref_model=hf, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                               ld_alpha=None)
    trl_chosen, trl_rejected = DPOTrainer.compute_ref_log_probs(ref_stub, hf, inputs)
    (ref_out,) = forwards

    # Same sequences: chosen rows, then rejected rows, right-padded with the pad id.
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    assert torch.equal(inputs["attention_mask"], batch["attention_mask"])
    # (a) Reply spans. TRL scores position t (of T - 1) for the label at t + 1; doge's targets[t] is
    # that same next token and its last column is always empty.
    completion = inputs["completion_mask"].bool()
    assert not (batch["targets"][:, -1] != -100).any()
    ours_span = batch["targets"][:, :-1] != -100
    for row in range(ours_span.shape[0]):
        assert torch.equal(ours_span[row], completion[row, 1:]), row
        assert torch.equal(ours_span[row], ref_out.label_mask[row]), row
    labels = inputs["input_ids"].masked_fill(~completion, -100)[:, 1:]
    assert torch.equal(batch["targets"][:, :-1], labels)
    assert int(ours_span.sum()) == sum(len(c) + len(r) for _, c, r in pairs)
    # (b) per-token log-probs on those positions, zero elsewhere on both sides
    assert torch.allclose(ours[:, :-1].detach(), ref_out.log_probs, atol=1e-5, rtol=0)
    assert not ours[:, -1].any() and not ours[:, :-1][~ours_span].any() and not ref_out.log_probs[~ours_span].any()
    # (c) the summed log-probability of each reply
    assert torch.allclose(chosen, trl_chosen, atol=1e-5, rtol=0)
    assert torch.allclose(rejected, trl_rejected, atol=1e-5, rtol=0)

    # The policy side: TRL's loss through its own forward (with gradients) against doge's.
    gen = torch.Generator().manual_seed(1)
    ref = torch.stack((chosen + torch.randn(6, generator=gen), rejected + torch.randn(6, generator=gen)), 1)
    obj.ref_logps["train"] = torch.zeros(len(obj.train_data), 2)
    obj.ref_logps["train"][:6] = ref
    ours_loss = obj.loss(ours_model, batch).loss_sum / obj.count_targets(batch)
    stub = trl_stub(beta=beta, loss_type="sigmoid")
    theirs_loss = DPOTrainer._compute_loss(stub, hf, {**inputs, "ref_chosen_logps": ref[:, 0],
                                                       "ref_rejected_logps": ref[:, 1]}, False)
    policy_out = forwards[-1]
    assert len(forwards) == 2 and policy_out.log_probs.requires_grad
    assert torch.allclose(ours[:, :-1].detach(), policy_out.log_probs.detach(), atol=1e-5, rtol=0)
    assert torch.allclose(ours_loss, theirs_loss, atol=1e-5, rtol=0), (float(ours_loss), float(theirs_loss))
    ours_params, theirs_params = dict(ours_model.named_parameters()), dict(hf.named_parameters())
    assert sorted(ours_params) == sorted(theirs_params)
    names = sorted(ours_params)
    ours_grad = torch.autograd.grad(ours_loss, [ours_params[n] for n in names])
    theirs_grad = torch.autograd.grad(theirs_loss, [theirs_params[n] for n in names])
    for name, a, b in zip(names, ours_grad, theirs_grad):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    assert any(a.abs().max() > 1e-4 for a in ours_grad)


def test_label_smoothing_is_conservative_dpo():
    from doge_cli.train.objectives.dpo import dpo_loss

    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    z = 0.5 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    expected = -0.8 * torch.nn.functional.logsigmoid(torch.tensor(z)) - 0.2 * torch.nn.functional.logsigmoid(torch.tensor(-z))
    assert float(loss) == pytest.approx(float(expected), abs=1e-7)


def test_truncation_keeps_prompt_end_and_reply_start(dpo_data, chat_root, tmp_path):
    obj = objective(dpo_data, chat_root / "start", tmp_path, **{"dpo.max_length": 10, "dpo.max_prompt_length": 4})
    p, c, r = obj.truncate(list(range(20)), [100, 101, 102, 103, 104, 105, 106], [200, 201])
    assert p == [16, 17, 18, 19] and c == [100, 101, 102, 103, 104, 105] and r == [200, 201]


def implicit_accuracy(policy_dir, ref_dir, data, tmp_path):
    from doge_cli.model import load_model

    obj = objective(data, ref_dir, tmp_path)
    policy, ref = (load_model(d, attn_implementation="sdpa") for d in (policy_dir, ref_dir))
    batch = obj.collate(rows(obj.eval_data, list(range(len(obj.eval_data)))))
    with torch.no_grad():
        pc, pr = obj._sequence_logps(policy, batch)
        rc, rr = obj._sequence_logps(ref, batch)
    return float(((pc - rc) > (pr - rr)).float().mean())


@pytest.mark.parametrize("reference", ["precomputed", "model"])
def test_dpo_lifts_held_out_preference_accuracy(dpo_data, chat_root, tmp_path, reference):
    result = run_stage("dpo", dpo_data, tmp_path / "run", chat_root / "start", steps=25,
                       **{"dpo.reference": reference, "dpo.beta": 0.5})
    acc = implicit_accuracy(result.final_dir, chat_root / "start", dpo_data, tmp_path)
    assert acc > 0.6, acc
    logged = metrics(tmp_path / "run")
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies"} <= set(logged[-1])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_dpo_resume_equals_straight_run(dpo_data, chat_root, tmp_path, optimizer):
    opt = {"optim.name": optimizer}
    run_stage("dpo", dpo_data, tmp_path / "straight", chat_root / "start", steps=6, **opt)
    run_stage("dpo", dpo_data, tmp_path / "resumed", chat_root / "start", steps=6, stop_after=3,
              **{"checkpoint.every": 3, **opt})
    run_stage("dpo", dpo_data, tmp_path / "resumed", chat_root / "start", steps=6, resume="auto",
              **{"checkpoint.every": 3, **opt})
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "resumed")]
    a, b = final_weights(tmp_path / "straight" / "final"), final_weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_rejected_column_is_a_one_line_error(dpo_data, chat_root, tmp_path):
    dd = datasets.load_from_disk(str(dpo_data))
    bad = tmp_path / "bad"
    datasets.DatasetDict({"train": dd["train"].remove_columns("rejected_input_ids")}).save_to_disk(str(bad))
    with pytest.raises(DogeError, match="rejected_input_ids") as err:
        objective(bad, chat_root / "start", tmp_path)
    assert "\n" not in str(err.value)


def test_prompt_limit_must_leave_room_for_the_reply():
    from doge_cli.config.loader import ConfigError

    with pytest.raises((ConfigError, DogeError), match="max_prompt_length"):
        resolve_config("dpo", hardware="cpu", overrides=["dpo.max_length=64", "dpo.max_prompt_length=64"])


def test_two_process_ddp_matches_one_process(dpo_data, chat_root, tmp_path):
    """The precomputed reference is split across processes and gathered; the run equals one process."""
    runs = {}
    for name, launcher in (("one", None), ("two", "ddp_cpu.yaml")):
        out = tmp_path / name
        stdout, runs[name] = launch_train("dpo", overrides(dpo_data, out, chat_root / "start", steps=4,
                                                           **{"logging.eval_every": 4}), out, launcher)
        if launcher:
            assert "x 2 processes" in stdout, stdout
    for key in ("loss", "rewards/margins"):
        assert [r[key] for r in runs["two"]] == pytest.approx([r[key] for r in runs["one"]], rel=1e-4, abs=1e-6), key
    assert runs["two"][-1]["eval_loss"] == pytest.approx(runs["one"][-1]["eval_loss"], rel=1e-4)


def test_precomputed_reference_is_split_between_processes(dpo_data, chat_root, tmp_path):
    """Each of 2 processes runs half of the forward passes (the same count), and their sum is the table."""
    from contextlib import nullcontext

    class Process:
        def __init__(self, rank, world):
            self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")

        def autocast(self):
            return nullcontext()

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor

    def table(rank, world):
        obj = built_objective("dpo", dpo_data, chat_root / "start", tmp_path, **{"logging.eval_batches": 2})
        model = obj.build_model()
        calls = []
        forward = model.forward
        model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        obj.after_prepare(model, Process(rank, world))
        return obj.ref_logps, len(calls)

    single, n_single = table(0, 1)
    (part0, n0), (part1, n1) = table(0, 2), table(1, 2)
    assert n0 == n1 and n0 < n_single
    for split in ("train", "eval"):
        both = part0[split] + part1[split]
        assert torch.allclose(both, single[split], rtol=1e-5, atol=1e-6), split
        # Each row came from exactly one process: the other holds a zero there.
        assert bool(((part0[split] == 0) ^ (part1[split] == 0)).all())
