"""Triton kernels behind the entropykv ops, registered for CUDA tensors (CPU tensors keep the references).

Imported by `entropykv_fx.ops` when triton is installed. The host wrappers (`score`, `max_attention`,
`attention_lse`, `gather`, `gather_int8`, `attention`) also run on CPU tensors under TRITON_INTERPRET=1, which is
how the tests check them without a GPU.
"""

from __future__ import annotations

from .. import ops
from .decode import _attention_cuda, _attention_int8_cuda, _attention_packed_cuda, attention
from .gather import gather, gather_int8
from .score import attention_lse, max_attention, score

ops.score.register_kernel("cuda")(score)
ops.max_attention.register_kernel("cuda")(max_attention)
ops.attention_lse.register_kernel("cuda")(attention_lse)
ops.gather.register_kernel("cuda")(gather)
ops.gather_int8.register_kernel("cuda")(gather_int8)
ops.attention.register_kernel("cuda")(_attention_cuda)
ops.attention_int8.register_kernel("cuda")(_attention_int8_cuda)
ops.attention_packed.register_kernel("cuda")(_attention_packed_cuda)

__all__ = ["attention", "attention_lse", "gather", "gather_int8", "max_attention", "score"]
