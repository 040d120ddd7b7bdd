"""Without CUDA, Triton kernels run in the CPU interpreter; the flag must be set before
triton is first imported, which the package does on import."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

