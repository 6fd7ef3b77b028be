"""``doge push``: a model folder (a run's ``final/``, an averaged model, ...) to the Hugging Face hub, with a
model card.

What is uploaded: the model folder's files (weights, config, generation config, tokenizer and chat
template; doge's own marker file is left out) plus a generated ``README.md``: YAML front matter the hub
reads (``library_name: transformers``, ``pipeline_tag: text-generation``, the license, ``base_model``
when the run started from a hub model, tags) and a body saying how to load it, with the run's figures
and settings and its ``doge eval`` results when the folder is a run's ``final/`` (the tables of
``doge report``). An existing ``README.md`` in the folder is kept as it is.

Everything goes through ``huggingface_hub`` (its endpoint, ``HF_ENDPOINT``, and token, ``HF_TOKEN`` or
``hf auth login``): the repo is created when missing (``--private`` for a private one), the branch when
``--revision`` names a new one, then one commit uploads the folder. The model folder is checked first
(offline or not, a folder that is not a model is reported before anything about the hub). Offline
(``HF_HUB_OFFLINE=1``), with no token, or when the hub refuses, the command ends with one line and nothing
local changes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from doge_cli.errors import DogeError

SKIP = {".doge-output"}  # doge's own bookkeeping, not part of the model
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def _front_matter(fields: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) + "---\n"


def model_card(model_dir: Path, repo_id: str, license: str, eval_paths: list[Path]) -> str:
    """The README.md of the pushed repo (front matter + body)."""
    from doge_cli.report import build, eval_rows, stage_rows

    model_dir = Path(model_dir)
    run_dir = model_dir.parent if model_dir.name == "final" and (model_dir.parent / "doge_run.json").is_file() else None
    fields: dict = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": license,
                    "tags": ["doge", "doge-cli", "small-language-model"]}
    stage = None
    lines: list[str] = []
    if run_dir is not None:
        runs = build([run_dir], eval_paths, labels=[run_dir.name])
        run = runs[0]
        stage = run.marker.get("stage")
        base = run.config.get("init_from")
        if isinstance(base, str) and REPO_ID.match(base) and not Path(base).exists():
            fields["base_model"] = base
        lines += ["## Training", "", f"Trained with doge, stage `{stage}`.", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {cells[0]} |" for label, cells in stage_rows([run])]
        evals = eval_rows([run])
        if evals:
            lines += ["", "## Evaluation (`doge eval`)", "", "| task metric | value |", "|---|---|"]
            lines += [f"| {label} | {cells[0]} |" for label, cells in evals]
    name = repo_id.split("/", 1)[1]
    usage = [
        f"# {name}", "",
        f"A Doge language model{f' ({stage} stage)' if stage else ''}, trained with doge (`doge-cli`). It loads "
        "in plain transformers, no remote code:", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        'inputs = tokenizer("Once upon a time", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        "```", "",
        f"or chat with it: `doge chat {repo_id}`.", "",
    ]
    return _front_matter(fields) + "\n" + "\n".join(usage + lines) + "\n"


def check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if (model_dir / "doge_run.json").is_file() and (model_dir / "final").is_dir():
        model_dir = model_dir / "final"  # a run folder: push its exported model
    if not model_dir.is_dir():
        raise DogeError(f"{model_dir} is not a folder; give a model folder (e.g. runs/sft/final) or a run folder")
    for need in ("config.json", "model.safetensors"):
        if not (model_dir / need).is_file():
            raise DogeError(f"{model_dir} has no {need}, so it is not a model folder doge or transformers wrote; "
                            "give e.g. runs/sft/final")
    return model_dir


def preflight(repo_id: str, what: str = "--repo") -> str:
    """The checks before any upload: a valid repo id, hub access allowed, a token; returns the token."""
    from doge_cli.offline import offline_flags

    if not REPO_ID.match(repo_id or ""):
        raise DogeError(f"{what} {repo_id!r} is not a hub repo id; use OWNER/NAME, e.g. my-user/Doge-20M-Instruct")
    flags = offline_flags()
    if flags:
        raise DogeError(f"pushing to the hub needs hub access, and {', '.join(flags)} is set in your environment; "
                        "unset it to push")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise DogeError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN, then push again")
    return token


def push(model_dir: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         license: str = "apache-2.0", eval_paths: list[Path] = (), message: str | None = None) -> str:
    """Upload ``model_dir`` with its model card to ``repo_id``; returns the commit URL."""
    # The local folder first: a wrong path or a folder that is not a model is the user's to fix whatever
    # the network, and is found without it (offline, or with no token, it would otherwise go unreported).
    model_dir = check_model_dir(model_dir)
    token = preflight(repo_id, what="--repo")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    card = model_card(model_dir, repo_id, license, list(eval_paths))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    with tempfile.TemporaryDirectory(prefix="doge-push-") as tmp:
        staging = Path(tmp) / "model"
        shutil.copytree(model_dir, staging, ignore=lambda _dir, names: [n for n in names if n in SKIP])
        if not (staging / "README.md").exists():
            (staging / "README.md").write_text(card, encoding="utf-8")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(folder_path=str(staging), repo_id=repo_id, revision=revision,
                                     commit_message=message or f"doge push {model_dir}")
        except HfHubHTTPError as err:
            status = getattr(err.response, "status_code", None)
            detail = " ".join(str(err).split())[:200]
            hint = {401: "check your token (hf auth login)", 403: "your token may not write to this namespace",
                    404: "check the repo id and that you may write to it"}.get(status, "see the hub's message")
            raise DogeError(f"the hub refused the push ({detail}); {hint}") from None
        except (OSError, ConnectionError) as err:
            raise DogeError(f"cannot reach the hub at {api.endpoint} ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:160]}); check your connection or HF_ENDPOINT") from None
        except Exception as err:  # httpx transport errors are not OSError subclasses
            if type(err).__module__.startswith("httpx"):
                raise DogeError(f"cannot reach the hub at {api.endpoint} ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:160]}); check your connection or HF_ENDPOINT") from None
            raise
    return str(getattr(info, "commit_url", info))


def license_ok(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9.+-]{2,40}", value):
        raise DogeError(f"--license {value!r} is not a license identifier the hub knows, e.g. apache-2.0 or mit")
    return value

