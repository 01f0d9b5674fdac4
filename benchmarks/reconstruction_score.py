"""One layer's reconstruction prefill work (the default scorer's) against the attention a plain prefill of the
same prompt runs, on CUDA (issue 17: the reconstruct scorer's prefill cost).

    python benchmarks/reconstruction_score.py --contexts 2048 8192 32768 --chunk 1024 --out DIR --tag h200

Per context n, the Llama-3-8B head layout (32 query / 8 KV heads of 128), bf16, batch 1, a reconstruction prefill
of the prompt and its repetition in chunks of --chunk tokens, 16 repeat-prompt tokens before each
(`entropykv_fx.reconstruct`): the median time (`triton.testing.do_bench`) of
  - `sdpa`: causal SDPA over the n prompt tokens (the layer's attention in a plain prefill);
  - `attention_reconstruction`: the reconstruction prefill's attention, keeping the normalizers (the prompt's
    causal attention, then per chunk the attention over the prompt before it and over itself, merged);
  - `score_reconstruction`: the scoring op as the prefill runs it (given the normalizers; entropy from the window);
  - `over_sdpa`: (attention_reconstruction + score_reconstruction) / sdpa, the layer's attention-side cost
    relative to a plain prefill's.
Writes reconstruction_score_<tag>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import commit, write_markdown
from triton.testing import do_bench

import entropykv_fx
from entropykv_fx import ops
from entropykv_fx.kernels.score import fused_lse_kernel
from entropykv_fx.reconstruct import repeat_context

HQ, HKV, D, REPEAT = 32, 8, 128, 16


def measure(n: int, chunk: int) -> dict:
    """One context's row of timings (ms)."""
    prompt_pos = torch.arange(n, device="cuda")[None]
    _, pos = repeat_context(torch.zeros(1, n, 1, device="cuda"), prompt_pos, torch.zeros(REPEAT, 1, device="cuda"),
                            chunk)
    total = pos.shape[1]
    q = torch.randn(1, HQ, total, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, HKV, total, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = D ** -0.5
    row = dict(context=n, chunk=chunk, prefill_tokens=total)
    row["sdpa_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n],
                                                                       is_causal=True, scale=scale, enable_gqa=True))
    row["attention_reconstruction_ms"] = do_bench(
        lambda: ops.attention_reconstruction(q, k, v, pos, pos, scale, 0, REPEAT, chunk))
    lse = ops.attention_reconstruction(q, k, v, pos, pos, scale, 0, REPEAT, chunk)[1]
    row["score_reconstruction_ms"] = do_bench(
        lambda: ops.score_reconstruction(q, k, pos, pos, scale, 0, 32, REPEAT, chunk, lse))
    row["fused_kernel"] = fused_lse_kernel(q)
    row["over_sdpa"] = (row["attention_reconstruction_ms"] + row["score_reconstruction_ms"]) / row["sdpa_ms"]
    row = {key: round(val, 4) if isinstance(val, float) else val for key, val in row.items()}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--chunk", type=int, default=entropykv_fx.EntropyKVConfig().reconstruct_chunk)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="gpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit(),
           "entropykv_fx": entropykv_fx.__version__, "shape": f"one layer, {HQ}/{HKV} heads of {D}", "dtype": "bfloat16",
           "command": "python benchmarks/reconstruction_score.py " + " ".join(
               f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v)}
    rows = [measure(n, args.chunk) for n in args.contexts]
    stem = Path(args.out) / f"reconstruction_score_{args.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    write_markdown(stem.with_suffix(".md"), env, rows)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
