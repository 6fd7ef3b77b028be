"""What doge patches in lighteval still exists with the assumed shape: an upgrade that moves any of it
fails here, loudly, instead of silently undoing a patch (doge_cli/eval/lighteval_patches.py)."""

import inspect

from doge_cli.eval import lighteval_patches as patches


def test_registry_loader_is_the_static_method_we_replace():
    from lighteval.tasks.registry import Registry

    original = Registry.__dict__["load_all_task_configs"]
    assert isinstance(original, staticmethod)
    assert list(inspect.signature(original.__func__).parameters) == ["custom_tasks", "load_multilingual"]
    fake = type("Config", (), {"name": "x"})()
    with patches.only_these_tasks([fake]):
        assert Registry.load_all_task_configs() == {"x": fake}
    assert Registry.__dict__["load_all_task_configs"] is original


def test_progress_bar_switch_is_the_module_global_the_bootstrap_reads():
    from lighteval.metrics.utils import stderr

    assert hasattr(stderr, "LIGHTEVAL_DISABLE_TQDM")
    assert "LIGHTEVAL_DISABLE_TQDM" in inspect.getsource(stderr)  # read at call time, not copied at import
    before = stderr.LIGHTEVAL_DISABLE_TQDM
    with patches.quiet():
        assert stderr.LIGHTEVAL_DISABLE_TQDM is True
    assert stderr.LIGHTEVAL_DISABLE_TQDM == before


def test_pipeline_hands_its_registry_to_the_model_cache():
    import sys

    patches.import_pipeline()  # a bare `import lighteval.pipeline` would switch autograd off for every later test
    pipeline = sys.modules["lighteval.pipeline"]
    assert "self.model._cache._init_registry(" in inspect.getsource(pipeline)
    assert callable(patches.NoCache()._init_registry)


def test_importing_the_pipeline_leaves_autograd_as_it_was():
    import subprocess
    import sys

    # In a fresh process: here lighteval may be imported already, and the switch happens at first import.
    code = ("import torch; from doge_cli.eval import lighteval_patches as p; p.import_pipeline(); "
            "print(torch.is_grad_enabled())")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
    code = "import torch, lighteval.pipeline; print(torch.is_grad_enabled())"  # what the patch is for
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
