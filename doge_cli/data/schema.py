"""Canonical raw columns per stage: every source, whatever its origin, is stored in these.

- ``pt``:   ``text`` (str); optional ``prompt`` (str): when present the row is rendered as a
            user (prompt) / assistant (text) conversation, as the seed does for cosmopedia.
- ``sft``:  ``messages`` (list of ``{"role", "content"}``).
- ``r1``:   ``messages`` as for sft; assistant turns use the thinking tokens.
- ``dpo``:  ``prompt`` (list of messages ending with a user turn), ``chosen`` and ``rejected`` (str).
- ``grpo``: ``prompt`` (str, the problem) and ``answer`` (str, exact and checkable).
- ``eval``: free form, described by each set's manifest.
"""

from __future__ import annotations

from typing import Any

from doge_cli.chat_format import last_boxed
from doge_cli.config.schema import TRAINING_STAGES
from doge_cli.errors import DogeError

# Data is made per training stage, plus r1: the R1 distillation conversations, which `doge train sft` trains on.
DATA_STAGES = (*TRAINING_STAGES, "r1")
TRAINED_BY = {**{stage: stage for stage in TRAINING_STAGES}, "r1": "sft"}


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "user": "user",
                 "assistant": "assistant", "system": "system"}


def to_messages(value: Any, where: str) -> list[dict]:
    """Accept ``[{"role","content"}]`` or ShareGPT ``[{"from","value"}]``; return role/content dicts."""
    if not isinstance(value, list):
        raise DogeError(f"{where}: expected a list of messages, got {type(value).__name__}; check --messages-field")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise DogeError(f"{where}: a message is {type(m).__name__}, expected an object with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None or content is None:
            raise DogeError(f"{where}: messages need 'role' and 'content' (or 'from' and 'value'); got keys {sorted(m)}")
        out.append({"role": _ROLE_ALIASES.get(str(role).lower(), str(role)), "content": str(content)})
    return out


def _reply(value: Any, where: str) -> str:
    # A chosen/rejected column may hold the whole conversation (ultrafeedback does): keep the last reply.
    if isinstance(value, list):
        msgs = to_messages(value, where)
        return msgs[-1]["content"] if msgs else ""
    return "" if value is None else str(value)


def _prompt_messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, list):
        return to_messages(value, where)
    return [{"role": "user", "content": "" if value is None else str(value)}]


def _feature_kind(feature) -> str:
    """What a datasets feature holds: ``string``, ``mixed``, ``list`` or an Arrow type name."""
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return "string"
    if type(feature).__name__ == "Json":  # datasets' type for a column whose rows differ in type
        return "mixed"
    if dtype == "list" or (dtype is None and hasattr(feature, "feature")):
        return "list"
    return "struct" if dtype is None else str(dtype)


def _values_kind(values: list) -> str:
    """The same for Python values (a batch of a streamed local file)."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds or kinds == {str}:
        return "string"
    if len(kinds) > 1:
        return "mixed"
    return {bool: "bool", int: "int64", float: "double", list: "list", dict: "struct"}.get(kinds.pop(), "object")


class _Columns:
    """Finds the column that holds each canonical field of a source, and checks that text is text."""

    def __init__(self, columns, kind_of, stage: str, fields: dict[str, str] | None, where: str):
        self.kind_of, self.stage, self.where = kind_of, stage, where
        self.fields = {k: v for k, v in (fields or {}).items() if v}
        self.cols = set(columns)

    def find(self, name: str, required: bool = True, fallbacks: tuple[str, ...] = ()) -> str | None:
        if name in self.fields:
            if self.fields[name] not in self.cols:
                raise DogeError(f"{self.where}: no field {self.fields[name]!r} (given for {name}); "
                                f"fields: {', '.join(sorted(self.cols))}")
            return self.fields[name]
        for cand in (name, *fallbacks):
            if cand in self.cols:
                return cand
        if required:
            raise DogeError(f"{self.where}: no {name!r} field for stage {self.stage}; fields: "
                            f"{', '.join(sorted(self.cols))}; map one with --{name}-field")
        return None

    def text(self, canonical: str, name: str | None, *, messages_ok: bool = False) -> None:
        """A column meant to hold text must be stored as text (or chat messages where those are allowed)."""
        if name is None:
            return
        kind = self.kind_of(name)
        if kind == "string":
            return
        if messages_ok and kind in ("mixed", "list"):
            return  # chat messages (a list per row): each row is checked when it is read
        kind = "mixed (not only text)" if kind == "mixed" else kind
        raise DogeError(f"{self.where}: field {name!r} (the {canonical}) holds {kind} values, not text; map a text "
                        f"column with --{canonical}-field or fix the file")


def _pt_rows(c: _Columns):
    text, prompt = c.find("text", fallbacks=("content",)), c.find("prompt", required=False)
    c.text("text", text)
    c.text("prompt", prompt)

    def fn(b):
        out = {"text": ["" if t is None else str(t) for t in b[text]]}
        if prompt:
            out["prompt"] = ["" if p is None else str(p) for p in b[prompt]]
        return out

    return fn, "text"


def _chat_rows(c: _Columns):
    msgs = c.find("messages", required="prompt" not in c.fields, fallbacks=("conversations",))
    prompt = answer = None
    if msgs is None:
        prompt, answer = c.find("prompt"), c.find("answer", fallbacks=("response", "completion"))
        c.text("prompt", prompt)
        c.text("answer", answer)
    system = "system" if "system" in c.cols else None

    def fn(b):
        out = []
        for i in range(len(b[msgs or prompt])):
            if msgs:
                conv = to_messages(b[msgs][i], c.where)
            else:
                conv = [{"role": "user", "content": str(b[prompt][i])},
                        {"role": "assistant", "content": str(b[answer][i])}]
            if system and b[system][i] and (not conv or conv[0]["role"] != "system"):
                conv = [{"role": "system", "content": str(b[system][i])}, *conv]
            out.append(conv)
        return {"messages": out}

    return fn, "messages"


def _dpo_rows(c: _Columns):
    prompt, chosen, rejected = c.find("prompt"), c.find("chosen"), c.find("rejected")
    for canonical, name in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        c.text(canonical, name, messages_ok=True)

    def fn(b):
        n = len(b[prompt])
        return {
            "prompt": [_prompt_messages(b[prompt][i], c.where) for i in range(n)],
            "chosen": [_reply(b[chosen][i], c.where) for i in range(n)],
            "rejected": [_reply(b[rejected][i], c.where) for i in range(n)],
        }

    return fn, "chosen"


def _grpo_rows(c: _Columns):
    prompt = c.find("prompt", fallbacks=("problem", "question"))
    answer = c.find("answer", fallbacks=("solution",))
    c.text("prompt", prompt, messages_ok=True)  # answers may be numbers: they are compared as text

    def fn(b):
        prompts, answers = [], []
        for p, a in zip(b[prompt], b[answer]):
            if isinstance(p, list):
                users = [m["content"] for m in to_messages(p, c.where) if m["role"] == "user"]
                p = users[-1] if users else ""
            a = "" if a is None else str(a)
            boxed = last_boxed(a)
            prompts.append("" if p is None else str(p))
            answers.append(boxed if boxed is not None else a.strip())
        return {"prompt": prompts, "answer": answers}

    return fn, "answer"


_ROWS = {"pt": _pt_rows, "sft": _chat_rows, "r1": _chat_rows, "dpo": _dpo_rows, "grpo": _grpo_rows}


def normalize(ds, stage: str, fields: dict[str, str] | None = None, where: str = "dataset"):
    """Map ``ds`` onto the canonical columns of ``stage``; ``fields`` maps canonical name -> column.

    Missing columns raise a :class:`DogeError` that lists the columns that exist; a column meant to
    hold text that holds numbers or lists is refused. Rows whose required text ends up empty are dropped.
    """
    if stage not in _ROWS:
        raise DogeError(f"unknown stage {stage!r}; choose from: {', '.join(DATA_STAGES)}")
    columns = _Columns(ds.column_names, lambda name: _feature_kind(ds.features[name]), stage, fields, where)
    fn, keep = _ROWS[stage](columns)
    out = ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"normalizing {where}")
    return out.filter(lambda b: _kept(b[keep], keep), batched=True)


def _kept(values: list, keep: str) -> list[bool]:
    if keep == "messages":
        return [len(m) > 0 for m in values]
    return [bool(str(x).strip()) for x in values]


def normalize_batch(batch: dict[str, list], stage: str, fields: dict[str, str] | None = None,
                    where: str = "dataset") -> dict[str, list]:
    """:func:`normalize` for one batch of rows (column -> values), with each text column's values checked
    in this batch: the streaming import of local files."""
    if stage not in _ROWS:
        raise DogeError(f"unknown stage {stage!r}; choose from: {', '.join(DATA_STAGES)}")
    columns = _Columns(batch, lambda name: _values_kind(batch[name]), stage, fields, where)
    fn, keep = _ROWS[stage](columns)
    out = fn(batch)
    mask = _kept(out[keep], keep)
    return {k: [v for v, m in zip(values, mask) if m] for k, values in out.items()}


def arrow_schema(stage: str, columns: list[str]):
    """The Arrow schema a normalized batch of ``stage`` is stored in (``columns``: the ones it has)."""
    import pyarrow as pa

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    types = {"text": pa.string(), "prompt": message if stage == "dpo" else pa.string(), "messages": message,
             "chosen": pa.string(), "rejected": pa.string(), "answer": pa.string()}
    return pa.schema([(c, types[c]) for c in columns])
