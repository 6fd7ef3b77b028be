import os

# The Triton kernels run on CPU through triton's interpreter; triton reads this when a kernel is
# decorated, so it must be set before doge_cli.kernels._dma_triton is first imported.
os.environ["TRITON_INTERPRET"] = "1"
