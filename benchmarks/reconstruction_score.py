"""One layer's reconstruction scoring (`entropykv::score_reconstruction`, the default scorer's prefill work) against
the attention that layer runs anyway, on CUDA (issue 17: the reconstruct scorer's prefill cost).

    python benchmarks/reconstruction_score.py --contexts 2048 8192 32768 --out DIR --tag h200 [--baseline FILE]

Per context n, the Llama-3-8B head layout (32 query / 8 KV heads of 128), bf16, batch 1, a reconstruction prefill
of 2n + 16 tokens ([prompt, 16 prompt tokens, prompt again]): the median time (`triton.testing.do_bench`) of
  - `sdpa`: causal SDPA over the 2n + 16 tokens (what the layer's attention costs in a prefill that scores nothing);
  - `attention_lse`: the same attention as the reconstruction prefill runs it, keeping the fused kernel's
    normalizers (cuDNN's attention where it takes the inputs, else FlashAttention-2; `attention_lse_kernel`);
  - `max_attention`: the Triton passes that score the n context slots from the n repeated queries (both passes);
  - `slot_pass`: the same given the normalizers (the second pass alone, what the prefill runs);
  - `score_reconstruction`: the whole op as the prefill runs it (with the normalizers; entropy from the window too);
  - `scoring_over_sdpa`: (attention_lse + score_reconstruction) / sdpa - 1, the layer's extra attention-side cost;
  - `flash_lse`: PyTorch's FlashAttention-2 asked for its log-sum-exp (attention_lse's fallback), with
    `flash_lse_diff`, the largest absolute difference of its normalizers from attention_lse's;
and, with --baseline FILE (a copy of an earlier `entropykv_fx/kernels/score.py`, e.g. from `git show`; the file
is executed: pass only code you trust), that file's `max_attention` on the same inputs, with the relative
difference between the two (norm of the difference / norm of the baseline's scores).
Writes reconstruction_score_<tag>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import commit, write_markdown
from triton.testing import do_bench

import entropykv_fx
from entropykv_fx import kernels, ops
from entropykv_fx.kernels.score import fused_lse_kernel

HQ, HKV, D, REPEAT = 32, 8, 128, 16


def load_baseline(path: str):
    """The `max_attention` of the kernel file at `path`, imported as a module of the entropykv_fx.kernels package."""
    spec = importlib.util.spec_from_file_location("entropykv_fx.kernels.baseline_score", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.max_attention


def flash_fallback(q, k, v, scale: float, lse) -> dict:
    """Time FlashAttention-2 with its log-sum-exp, what attention_lse runs where cuDNN refuses the inputs."""
    def call():
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    return dict(flash_lse_ms=do_bench(call), flash_lse_diff=float((call()[1].float() - lse).abs().max()))


def measure(n: int, baseline) -> dict:
    """One context's row of timings (ms) and, with a baseline, the relative difference of its scores."""
    total = 2 * n + REPEAT
    q = torch.randn(1, HQ, total, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, HKV, total, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.arange(total, device="cuda")[None]
    q_rec, pos_rec = q[:, :, n + REPEAT:].contiguous(), pos[:, n + REPEAT:]
    scale = D ** -0.5
    row = dict(context=n, prefill_tokens=total)
    row["sdpa_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                       enable_gqa=True))
    row["attention_lse_ms"] = do_bench(lambda: ops.attention_lse(q, k, v, pos, pos, scale, 0))
    lse = ops.attention_lse(q, k, v, pos, pos, scale, 0)[1]
    row["max_attention_ms"] = do_bench(lambda: kernels.max_attention(q_rec, k, pos_rec, pos, scale, 0, n))
    lse_rec = lse[:, :, n + REPEAT:].contiguous()
    row["slot_pass_ms"] = do_bench(lambda: kernels.max_attention(q_rec, k, pos_rec, pos, scale, 0, n, lse_rec))
    row["score_reconstruction_ms"] = do_bench(lambda: ops.score_reconstruction(q, k, pos, pos, scale, 0, 32, REPEAT,
                                                                               lse))
    row["attention_lse_kernel"] = fused_lse_kernel(q)
    row.update(flash_fallback(q, k, v, scale, lse))
    if baseline is not None:
        ours, before = (f(q_rec, k, pos_rec, pos, scale, 0, n) for f in (kernels.max_attention, baseline))
        row["baseline_max_attention_ms"] = do_bench(lambda: baseline(q_rec, k, pos_rec, pos, scale, 0, n))
        row["rel_diff"] = float((ours - before).norm() / before.norm())
    row["scoring_over_sdpa"] = (row["attention_lse_ms"] + row["score_reconstruction_ms"]) / row["sdpa_ms"] - 1
    row = {key: round(val, 4) if isinstance(val, float) else val for key, val in row.items()}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--baseline", help="an earlier kernels/score.py to time beside this one (executed)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="gpu")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    torch.manual_seed(0)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit(),
           "entropykv_fx": entropykv_fx.__version__, "shape": f"one layer, {HQ}/{HKV} heads of {D}", "dtype": "bfloat16",
           "command": "python benchmarks/reconstruction_score.py " + " ".join(
               f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v)}
    rows = [measure(n, baseline) for n in args.contexts]
    stem = Path(args.out) / f"reconstruction_score_{args.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    write_markdown(stem.with_suffix(".md"), env, rows)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
