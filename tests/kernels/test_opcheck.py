"""opcheck of the ops whose CUDA implementations are the Triton kernels (their fakes vs the kernels' outputs)."""

import pytest
import torch
from kernel_testing import GPU, prompt_positions, randn, seed

from entropykv_fx import ops
from entropykv_fx.reconstruct import repeat_context

pytestmark = pytest.mark.skipif(not GPU, reason="the ops dispatch to Triton for CUDA tensors only")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_through_the_cuda_kernels(dtype):
    seed("opcheck cuda", dtype)
    b, hq, hkv, s, d = 2, 8, 2, 300, 64
    q, k, v = randn(b, hq, 1, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype)
    k_pos = prompt_positions(b, s, [0, 7])
    q_pos = k_pos[:, -1:] + 1
    torch.library.opcheck(ops.attention, (q, k, v, q_pos, k_pos, d ** -0.5, 0))  # decode: the Triton kernel
    window = randn(b, hq, 16, d, dtype=dtype)
    torch.library.opcheck(ops.score, (window, k, k_pos[:, -16:], k_pos, d ** -0.5, 0))
    idx = torch.arange(0, s, 3, device=k.device)[None].expand(b, -1).contiguous()
    torch.library.opcheck(ops.gather, (k, v, idx))
    torch.library.opcheck(ops.gather, (k, v, idx[:, None].expand(-1, hkv, -1).contiguous()))
    starts = torch.tensor([0, 220, 600], device=k.device)  # a packed head-wise layer: heads of 220 and 380 slots
    packed = (k.reshape(b, hkv * s, d), v.reshape(b, hkv * s, d), q_pos, k_pos.repeat(1, hkv), starts)
    torch.library.opcheck(ops.attention_packed, (q, packed[0], packed[1], *packed[2:], d ** -0.5, 0))
    # the reconstruction prefill's ops: attention with its normalizers (the flash kernel's, unpadded) and the
    # scoring pass given them
    pos = prompt_positions(b, s, [0, 0])
    prefill_q = randn(b, hq, s, d, dtype=dtype)
    torch.library.opcheck(ops.attention_lse, (prefill_q, k, v, pos, pos, d ** -0.5, 0))
    torch.library.opcheck(ops.attention_lse, (prefill_q, k, v, k_pos, k_pos, d ** -0.5, 0))  # padded: first pass
    lse = ops.attention_lse(prefill_q, k, v, pos, pos, d ** -0.5, 0)[1]
    torch.library.opcheck(ops.max_attention, (prefill_q, k, pos, pos, d ** -0.5, 0, s // 2, lse))
    # a chunked reconstruction prefill (left-padded rows): each segment's attention and the scoring of its chunk
    for pads in ([0, 7], [0, 0]):  # the general path, and the fused one of unpadded rows
        prompt = prompt_positions(b, 150, pads)
        _, rec_pos = repeat_context(torch.zeros(b, 150, 1, device=k.device), prompt, torch.zeros(3, 1, device=k.device),
                                    64)
        t = rec_pos.shape[1]
        rq, rk, rv = randn(b, hq, t, d, dtype=dtype), randn(b, hkv, t, d, dtype=dtype), randn(b, hkv, t, d, dtype=dtype)
        torch.library.opcheck(ops.attention_reconstruction, (rq, rk, rv, rec_pos, rec_pos, d ** -0.5, 0, 3, 64))
        rec_lse = ops.attention_reconstruction(rq, rk, rv, rec_pos, rec_pos, d ** -0.5, 0, 3, 64)[1]
        torch.library.opcheck(ops.score_reconstruction, (rq, rk, rec_pos, rec_pos, d ** -0.5, 0, 16, 3, 64, rec_lse))
