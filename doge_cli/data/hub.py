"""Hugging Face hub sources: the seed's datasets, fetched with ``datasets.load_dataset``.

The same code reads a local folder laid out like the hub (``--hub-mirror DIR`` holding
``DIR/<owner>/<name>/``), which is how air-gapped machines and the offline tests use it.
A sliced or streamed download is written in shards as it goes, so an interrupted one resumes
where it stopped; a full download relies on the datasets cache, which resumes file downloads.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from doge_cli.errors import DogeError
from doge_cli.io import atomic_file
from doge_cli.offline import hub_offline

SHARD_ROWS = 10_000


@dataclass(frozen=True)
class HubSource:
    """A dataset on the hub and how its columns map onto a stage's canonical schema."""

    name: str
    stage: str
    repo: str
    config: str | None = None
    split: str = "train"
    fields: dict[str, str] = field(default_factory=dict)
    licence: str = ""


HUB_SOURCES: dict[str, HubSource] = {
    s.name: s
    for s in (
        HubSource("fineweb-edu-dedup", "pt", "HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup", licence="ODC-By 1.0"),
        HubSource("cosmopedia-v2", "pt", "HuggingFaceTB/smollm-corpus", "cosmopedia-v2", licence="ODC-By 1.0"),
        HubSource("finemath", "pt", "HuggingFaceTB/finemath", "finemath-4plus", licence="ODC-By 1.0"),
        HubSource("smoltalk", "sft", "HuggingFaceTB/smoltalk", "all", licence="Apache-2.0"),
        HubSource("ultrafeedback_binarized", "dpo", "HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs",
                  licence="MIT"),
        HubSource("bespoke-stratos-17k", "r1", "bespokelabs/Bespoke-Stratos-17k", None,
                  fields={"messages": "conversations"}, licence="Apache-2.0"),
        HubSource("numinamath-tir", "grpo", "AI-MO/NuminaMath-TIR", None,
                  fields={"prompt": "problem", "answer": "solution"}, licence="Apache-2.0"),
    )
}


def offline_error(what: str) -> DogeError:
    return DogeError(
        f"{what} needs the Hugging Face hub, which is offline here (HF_HUB_OFFLINE or no network); "
        "use `doge data download --recipe quickstart` for the builtin offline data, "
        "or point --hub-mirror at a local copy"
    )


def _resolve(src: HubSource, hub_mirror: Path | None) -> tuple[str, bool]:
    if hub_mirror is not None:
        local = Path(hub_mirror) / src.repo
        if not local.is_dir():
            raise DogeError(f"--hub-mirror {hub_mirror} has no folder {src.repo}; copy the dataset there")
        return str(local), True
    if hub_offline():
        raise offline_error(f"source {src.name!r} ({src.repo})")
    return src.repo, False


def _load_error(src: HubSource, err: Exception, is_local: bool) -> DogeError:
    text = " ".join(str(err).split())[:200]
    if is_local:
        return DogeError(f"cannot read {src.name} from the mirror: {text}")
    if hub_offline() or any(k in text.lower() for k in ("connection", "offline", "resolve", "timed out", "network")):
        return offline_error(f"source {src.name!r} ({src.repo})")
    return DogeError(f"cannot load {src.repo} from the hub: {text}")


def load_hub_source(src: HubSource, *, max_examples: int | None, streaming: bool, revision: str | None,
                    hub_mirror: Path | None, partial_dir: Path, log: Callable[[str], None] = lambda _m: None):
    """Load ``src`` (all rows, or the first ``max_examples``) as a ``datasets.Dataset``.

    Streaming writes parquet shards under ``partial_dir`` as rows arrive; a rerun with the same
    settings skips the rows already there, and so does a retry after the hub answers HTTP 429 or 5xx
    (:func:`stream_to_shards`). The caller removes ``partial_dir`` once saved.
    """
    import datasets

    path, is_local = _resolve(src, hub_mirror)
    kwargs = {"name": src.config, "split": src.split, "revision": None if is_local else revision}
    if not (streaming or max_examples is not None):
        try:
            return datasets.load_dataset(path, **kwargs)
        except DogeError:
            raise
        except Exception as err:  # datasets/hub raise many types for "not reachable" and "not found"
            raise _load_error(src, err, is_local) from err

    def open_stream():
        return datasets.load_dataset(path, streaming=True, **kwargs)

    key = {"repo": src.repo, "config": src.config, "split": src.split, "revision": revision}
    return stream_to_shards(open_stream, key, max_examples, partial_dir, name=src.name, log=log,
                            error=lambda err: _load_error(src, err, is_local))


RETRY_STATUS = (429, 500, 502, 503, 504)
RETRIES = 8  # attempts in a row without a new row in between
_STATUS_WORDS = {429: "too many requests", 500: "internal server error", 502: "bad gateway", 503: "service unavailable",
                 504: "gateway timeout"}


def http_status(err: BaseException) -> int | None:
    """The HTTP status a (possibly wrapped) error from the hub, fsspec, requests or httpx carries, if any."""
    seen = 0
    while err is not None and seen < 10:
        for value in (getattr(err, "status", None), getattr(err, "status_code", None),
                      getattr(getattr(err, "response", None), "status_code", None),
                      getattr(getattr(err, "response", None), "status", None)):
            if isinstance(value, int) and 100 <= value < 600:
                return value
        m = re.search(r"\b(429|5\d\d)\b[^\n]{0,40}?(Too Many Requests|Internal Server Error|Bad Gateway|Service "
                      r"Unavailable|Gateway Time-?out)", str(err), re.IGNORECASE)
        if m:
            return int(m.group(1))
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _retry_after(err: BaseException) -> float | None:
    while err is not None:
        headers = getattr(getattr(err, "response", None), "headers", None) or getattr(err, "headers", None)
        if headers is not None and headers.get("Retry-After"):
            try:
                return max(0.0, float(headers.get("Retry-After")))
            except ValueError:
                return None
        err = err.__cause__ or err.__context__
    return None


def stream_to_shards(open_stream: Callable, key: dict, max_examples: int | None, partial_dir: Path, *, name: str,
                     log: Callable[[str], None], error: Callable[[Exception], DogeError],
                     sleep: Callable[[float], None] = time.sleep):
    """Rows of ``open_stream()`` (an iterable dataset) written as parquet shards under ``partial_dir``, the
    first ``max_examples`` of them; returns them as a ``datasets.Dataset`` read from the shards.

    On HTTP 429 or 5xx the rows so far are kept, the wait is said (the server's Retry-After, else 1, 2, 4 ...
    up to 60 s), and the stream is opened again past them; after :data:`RETRIES` failures in a row without
    a new row, the error is the last one."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    state_path = partial_dir / "partial.json"
    if partial_dir.exists():
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if state.get("key") != key:
            shutil.rmtree(partial_dir)  # shards from other settings: start over
    partial_dir.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({"key": key}))
    shards = sorted(partial_dir.glob("shard-*.parquet"))
    done = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    buf: list[dict] = []

    def flush():
        nonlocal buf
        if not buf:
            return
        final = partial_dir / f"shard-{len(shards):05d}.parquet"
        with atomic_file(final) as tmp:  # a shard is either whole or absent
            pq.write_table(pa.Table.from_pylist(buf), tmp)
        shards.append(final)
        buf = []

    failures = 0
    while max_examples is None or done < max_examples:
        at_start = done
        try:
            stream = open_stream()
            if done:
                stream = stream.skip(done)
            for row in stream:
                if max_examples is not None and done >= max_examples:
                    break
                buf.append(row)
                done += 1
                if len(buf) >= SHARD_ROWS:
                    flush()
            flush()
            break
        except DogeError:
            raise
        except Exception as err:
            flush()
            status = http_status(err)
            failures = 1 if done > at_start else failures + 1
            if status not in RETRY_STATUS or failures >= RETRIES:
                raise error(err) from err
            wait = _retry_after(err)
            wait = min(60.0, 2.0 ** (failures - 1)) if wait is None else min(wait, 300.0)
            log(f"{name}: the hub answered HTTP {status} ({_STATUS_WORDS.get(status, 'server error')}) after "
                f"{done:,} rows; waiting {wait:g} s, then continuing (attempt {failures + 1} of {RETRIES})")
            sleep(wait)
    if not shards:
        raise DogeError(f"{name}: the source returned no rows")
    return datasets.Dataset.from_parquet([str(s) for s in shards])
