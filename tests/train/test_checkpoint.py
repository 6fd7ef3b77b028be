"""Checkpoint reading: every piece checked and named, the newest complete one picked, windows merged."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from doge_cli.errors import DogeError
from doge_cli.train import checkpoint as ckpt


def _write(run_dir, step, *, world=1, skip=()):
    """A checkpoint folder as ``ckpt.save`` lays it out, for one process, without a model."""
    path = run_dir / "checkpoints" / ckpt.step_dir_name(step)
    path.mkdir(parents=True)
    pieces = {
        ckpt.WEIGHTS: lambda p: save_file({"w": torch.ones(2)}, str(p)),
        ckpt.OPTIMIZER: lambda p: torch.save({"state": {}, "param_groups": []}, p),
        "config.yaml": lambda p: p.write_text("stage: pt\n"),
        ckpt.STATE_FILE: lambda p: p.write_text(json.dumps({"step": step, "world_size": world})),
    }
    for rank in range(world):
        pieces[ckpt.rank_file(rank)] = lambda p, r=rank: torch.save({"rng": ckpt.rng_state(),
                                                                     "window": {"loss": float(r + 1)}}, p)
    for name, write in pieces.items():
        if name not in skip:
            write(path / name)
    return path


def test_a_complete_checkpoint_reads_whole(tmp_path):
    path = _write(tmp_path, 4, world=2)
    pieces = ckpt.read_pieces(path)
    assert pieces["state"]["step"] == 4 and torch.equal(pieces["model"]["w"], torch.ones(2))
    assert [r["window"]["loss"] for r in pieces["ranks"]] == [1.0, 2.0]


@pytest.mark.parametrize("piece, named", [
    (ckpt.WEIGHTS, "lacks model.safetensors"), (ckpt.OPTIMIZER, "lacks optimizer.pt"),
    ("rank-00000.pt", "lacks rank-00000.pt"), ("config.yaml", "config.yaml"),
])
def test_a_missing_piece_is_named(tmp_path, piece, named):
    path = _write(tmp_path, 2, skip={piece})
    with pytest.raises(DogeError, match=named):
        ckpt.read_pieces(path)


def test_pick_resume_passes_over_broken_newer_checkpoints(tmp_path):
    _write(tmp_path, 2)
    _write(tmp_path, 4)
    broken = _write(tmp_path, 6)
    (broken / ckpt.OPTIMIZER).write_bytes(b"not a torch file")
    said = []
    path, pieces = ckpt.pick_resume(tmp_path, "auto", log=said.append)
    assert path.name == "step-000004" and pieces["state"]["step"] == 4
    assert len(said) == 1 and "step-000006" in said[0] and "optimizer.pt" in said[0]


def test_pick_resume_without_checkpoints_starts_fresh_and_with_only_broken_ones_refuses(tmp_path):
    assert ckpt.pick_resume(tmp_path, "auto", log=print) is None
    (_write(tmp_path, 2) / ckpt.STATE_FILE).write_text("{")
    with pytest.raises(DogeError, match="no checkpoint .* can be resumed"):
        ckpt.pick_resume(tmp_path, "auto", log=lambda _m: None)


def test_an_explicit_checkpoint_must_read_completely(tmp_path):
    path = _write(tmp_path, 2, skip={ckpt.WEIGHTS})
    with pytest.raises(DogeError, match="lacks model.safetensors"):
        ckpt.pick_resume(tmp_path, str(path), log=print)
    with pytest.raises(DogeError, match="not a complete checkpoint folder"):
        ckpt.pick_resume(tmp_path, str(tmp_path), log=print)


def test_temporary_folders_are_not_checkpoints(tmp_path):
    _write(tmp_path, 2)
    (tmp_path / "checkpoints" / ".tmp-step-000004").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002"]


def test_windows_of_several_processes_merge_by_sum():
    merged = ckpt.merge_windows([{"loss": 1.0, "targets": 3, "metrics": {"a": 1.0}},
                                 {"loss": 2.0, "targets": 4, "metrics": {"a": 0.5, "b": 2.0}}])
    assert merged == {"loss": 3.0, "targets": 7, "metrics": {"a": 1.5, "b": 2.0}}


def test_strict_weight_loading_allows_only_a_tied_head_to_be_absent():
    model = torch.nn.Module()
    model.config = SimpleNamespace(tie_word_embeddings=False)
    model.lin = torch.nn.Linear(2, 2)
    with pytest.raises(DogeError, match="missing \\['lin.bias'\\]"):
        ckpt.load_weights_strictly(model, {"lin.weight": torch.zeros(2, 2)}, where="test")
    with pytest.raises(DogeError, match="unexpected \\['_orig_mod.lin.weight'\\]"):
        ckpt.load_weights_strictly(model, {"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2),
                                           "_orig_mod.lin.weight": torch.zeros(2, 2)}, where="test")
    with pytest.raises(DogeError, match="does not fit"):
        ckpt.load_weights_strictly(model, {"lin.weight": torch.zeros(3, 2), "lin.bias": torch.zeros(2)}, where="test")
