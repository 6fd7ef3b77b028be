"""``doge data download``: fetch a recipe's sources, or import local files, into the datasets folder.

Each source lands at ``<save_dir>/<stage>/<source>/`` (``datasets.save_to_disk``) with a
``manifest.json`` (source, revision, rows, bytes, stage, columns). Evaluation sets land at
``<save_dir>/eval/<name>/`` with a ``test.jsonl`` beside the Arrow files.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from doge_cli.data.builtin import BUILTIN_SOURCES, builtin_dataset
from doge_cli.data.hub import HUB_SOURCES, load_hub_source
from doge_cli.data.schema import DATA_STAGES, normalize
from doge_cli.data.storage import folder_bytes, save_dataset
from doge_cli.errors import DogeError
from doge_cli.io import check_apart, check_component, check_replaceable, write_json

# The seed's pretraining mixture without python-edu: smollm-corpus's python-edu rows hold only Software
# Heritage blob ids; the code itself sits in Software Heritage's S3 bucket, one object per file, which
# the seed fetched with boto3. doge does not fetch it; a copy with text is added with --local.
NOT_ON_THE_HUB = {
    "python-edu": "smollm-corpus's python-edu rows hold only Software Heritage blob ids (the code is in "
                  "Software Heritage's S3 bucket), so doge does not download it; fetch the files yourself and add "
                  "them (jsonl or parquet with a text column) with `doge data download --local FILE --stage pt --name python-edu`",
}

RECIPES: dict[str, tuple[str, ...]] = {
    "pretrain": ("fineweb-edu-dedup", "cosmopedia-v2", "finemath"),
    "sft": ("smoltalk",),
    "dpo": ("ultrafeedback_binarized",),
    "r1": ("bespoke-stratos-17k", "numinamath-tir"),
    "grpo": ("numinamath-tir",),
    "quickstart": tuple(BUILTIN_SOURCES),
}


def _pick(recipe: str, sources: list[str] | None) -> list[str]:
    if recipe not in RECIPES:
        raise DogeError(f"unknown recipe {recipe!r}; choose from: {', '.join(RECIPES)}")
    names = list(RECIPES[recipe])
    if not sources:
        return names
    unknown = [s for s in sources if s not in names]
    if unknown and unknown[0] in NOT_ON_THE_HUB:
        raise DogeError(NOT_ON_THE_HUB[unknown[0]])
    if unknown:
        raise DogeError(f"recipe {recipe} has no source {unknown[0]!r}; its sources: {', '.join(names)}")
    return [n for n in names if n in sources]


def download_recipe(
    recipe: str,
    save_dir: Path,
    *,
    sources: list[str] | None = None,
    max_examples: int | None = None,
    streaming: bool = False,
    revision: str | None = None,
    hub_mirror: Path | None = None,
    seed: int = 233,
    log: Callable[[str], None] = lambda _m: None,
) -> list[dict]:
    """Download (or build) every source of ``recipe``; returns their manifests."""
    names = _pick(recipe, sources)
    if max_examples is not None and max_examples <= 0:
        raise DogeError("--max-examples must be positive")
    save_dir = Path(save_dir)
    for name in names:  # before any download: a destination doge may not replace fails now, not later
        stage = BUILTIN_SOURCES[name].stage if name in BUILTIN_SOURCES else HUB_SOURCES[name].stage
        check_replaceable(save_dir / stage / name, f"source folder of {name}")
    manifests = []
    for name in names:
        if name in BUILTIN_SOURCES:
            src = BUILTIN_SOURCES[name]
            ds = builtin_dataset(name, seed=seed, max_examples=max_examples)
            manifest = save_dataset(
                ds, save_dir / src.stage / name, stage=src.stage, source=f"builtin:{name}",
                revision=_package_version(src.package), extra={"package": src.package, "seed": seed},
                jsonl=src.stage == "eval",
            )
        else:
            src = HUB_SOURCES[name]
            dest = save_dir / src.stage / name
            partial = dest.parent / f".{name}.partial"
            raw = load_hub_source(src, max_examples=max_examples, streaming=streaming, revision=revision,
                                  hub_mirror=hub_mirror, partial_dir=partial, log=log)
            ds = normalize(raw, src.stage, src.fields, where=f"{src.repo}:{src.config or src.split}")
            if len(ds) == 0:
                raise DogeError(f"{name}: no usable rows after normalizing; check the source")
            manifest = save_dataset(
                ds, dest, stage=src.stage, source=f"hub:{src.repo}" + (f"/{src.config}" if src.config else ""),
                revision=revision or "main", extra={"split": src.split, "max_examples": max_examples},
            )
            shutil.rmtree(partial, ignore_errors=True)
        log(f"{src.stage}/{name}: {manifest['rows']:,} rows, {manifest['bytes'] / 2**20:.1f} MiB")
        manifests.append(manifest)
    return manifests


def import_local(
    path: Path,
    save_dir: Path,
    *,
    stage: str,
    name: str | None = None,
    fields: dict[str, str] | None = None,
    max_examples: int | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Read local files, map their fields onto ``stage``'s schema and save them as a source.

    The files are streamed a batch of rows at a time into the source's Arrow files, so memory does not
    grow with the corpus. A problem found part-way (a bad line) leaves nothing behind.
    """
    import pyarrow as pa

    from doge_cli.data.arrowio import DatasetWriter
    from doge_cli.data.local import iter_local
    from doge_cli.data.schema import arrow_schema, normalize_batch
    from doge_cli.io import atomic_dir

    if stage not in DATA_STAGES:
        raise DogeError(f"unknown stage {stage!r}; choose from: {', '.join(DATA_STAGES)}")
    path = Path(path)
    if name is None:  # the file's name, made a plain folder name
        name = re.sub(r"[^\w.+@=-]+", "-", path.resolve().stem).strip("-.") or "local"
    name = check_component(name, "--name")
    if max_examples is not None and max_examples <= 0:
        raise DogeError("--max-examples must be positive")
    dest = Path(save_dir) / stage / name
    check_apart(dest, {"--local input": path}, "the source folder")
    check_replaceable(dest, f"source folder {stage}/{name}")
    batches = iter_local(path, max_examples)
    first = next(batches)  # the file's own problems (missing, empty, unreadable) before anything is created
    created = [p for p in (Path(save_dir), Path(save_dir) / stage) if not p.exists()]
    try:
        with atomic_dir(dest, kind=f"{stage} dataset") as tmp:
            writer = None
            for batch in _chain(first, batches):
                rows = normalize_batch(batch, stage, fields, where=str(path))
                if writer is None:
                    writer = DatasetWriter(tmp, arrow_schema(stage, list(rows)))
                writer.write(pa.table(rows, schema=writer.schema))
            if writer is None or writer.rows == 0:
                raise DogeError(f"{path}: no usable rows (all empty after mapping the fields)")
            writer.close()
            manifest = {"source": f"local:{path.resolve()}", "revision": None, "stage": stage, "rows": writer.rows,
                        "columns": list(writer.schema.names), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "fields": fields or {}, "bytes": folder_bytes(tmp)}
            write_json(tmp / "manifest.json", manifest)
    except BaseException:
        for folder in reversed(created):  # the folders this import made for itself, when left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    log(f"{stage}/{name}: {manifest['rows']:,} rows, {manifest['bytes'] / 2**20:.1f} MiB")
    return manifest


def _chain(first, rest):
    yield first
    yield from rest


def _package_version(package: str) -> str | None:
    from importlib import metadata

    dist = package.split(" ")[0].split(",")[0]
    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return None
