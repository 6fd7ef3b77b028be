"""Data for every stage: sources (hub, builtin offline, local files), download, tokenizer
training, tokenization per stage with packing, and ratio-weighted merge with a held-out split.

On-disk layout under a datasets folder (``./datasets`` by default)::

    <stage>/<source>/            raw examples in a canonical schema (datasets.save_to_disk layout) + manifest.json
    eval/<name>/                 held-out evaluation sets (also as test.jsonl)
    tokenized/pt/<source>/       shard-I-of-N/: a 2-byte token stream + document-start bits (data/blocks.py)
    tokenized/<stage>/<source>/  token ids for one source (sft, dpo, grpo, r1) + manifest.json (its cache key)
    merged/pt/                   an index of (source, block) rows over tokenized/pt, what ``doge train pt`` reads
    merged/<stage>/              DatasetDict with ``train`` and ``test`` splits, what the other stages read

Every command streams (a batch of rows in memory at a time). Stages are ``pt``, ``sft``, ``dpo``, ``grpo``
and ``r1``; see :mod:`doge_cli.data.schema` for the columns of each.
"""
