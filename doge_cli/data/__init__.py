"""Data for every stage: sources (hub, builtin offline, local files), download, tokenizer
training, tokenization per stage with packing, and ratio-weighted merge with a held-out split.

On-disk layout under a datasets folder (``./datasets`` by default)::

    <stage>/<source>/            raw examples in a canonical schema (datasets.save_to_disk) + manifest.json
    eval/<name>/                 held-out evaluation sets (also as test.jsonl)
    tokenized/<stage>/<source>/  token ids for one source + cache.json (tokenizer fingerprint + settings)
    merged/<stage>/              DatasetDict with ``train`` and ``test`` splits, what ``doge train`` reads

Stages are ``pt``, ``sft``, ``dpo``, ``grpo`` and ``r1``; see :mod:`doge_cli.data.schema` for the
columns of each.
"""
