"""Evaluation: lighteval's Pipeline in-process on doge models (run.py), builtin offline tasks
(tasks.py), a unigram perplexity baseline (baseline.py) and held-out SFT loss (sft_loss.py)."""
