"""Settings every test of the suite runs under, whichever folder or file is run."""

import os

# Tests never touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton kernels run on CPU through triton's interpreter. triton reads this when a kernel is
# decorated (when doge_cli.kernels._dma_triton is first imported), so it is set here, before any test
# module imports doge. The triton backend refuses to run without it (no silent fallback), so a test
# of that backend always runs the kernel itself.
os.environ["TRITON_INTERPRET"] = "1"
