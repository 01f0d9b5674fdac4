"""Kernel tests run on CUDA when there is a GPU, else on CPU through Triton's interpreter (small shapes).

TRITON_INTERPRET must be set before the kernels are built (at `import entropykv_fx`): this top-level conftest
is loaded before any test module, whatever order or subset of tests pytest is given.
"""

import importlib.util
import os

import torch

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
