"""kvpress's prefill and decode speed on the speed benchmark's model, for the rows speed.py cannot run itself.

    /tmp/kvpress-venv/bin/python benchmarks/kvpress_speed.py --out benchmarks/results --tag h100

Runs inside the kvpress venv (benchmarks/kvpress_env.sh: kvpress 0.5.5 needs transformers < 5.3) and imports
nothing from entropykv_fx. The same Llama-3-8B-shaped model with random bf16 weights as benchmarks/speed.py; per
context and kept fraction, each press compresses during the prefill (`with press(model)`, kvpress's documented use,
`compression_ratio = 1 - kept`), then HF's eager decode runs token by token over the compressed DynamicCache, as in
kvpress's pipeline. Next to each decode time: the bandwidth ideal, (weights + kept KV bytes) / copy bandwidth, as in
speed.py. A full-cache row (no press) is the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root: benchmarks.timing
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from benchmarks.timing import (SHAPES, eager_decode_ms, peak_gib, random_llama, reset_peak, run_environment,  # noqa: E402
                               seconds, write_markdown)

# kvpress's presses by name, as the quality benchmark's runner builds them (it imports nothing from entropykv_fx).
sys.path.append(str(Path(__file__).resolve().parents[1] / "entropykv_fx" / "bench"))
from kvpress_runner import PRESSES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=int, nargs="+", default=[131072, 32768])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.1], help="kept fractions")
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=PRESSES)
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="h100")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = random_llama(args.shape, device, max(args.contexts))
    config = model.config
    env, bandwidth, weight_bytes = run_environment(device, args.shape, model)
    env.update(kvpress=version("kvpress"), transformers=version("transformers"))
    print(json.dumps(env), flush=True)
    rows: list[dict] = []
    out_file = args.out / f"kvpress_speed_{args.tag}.json"
    args.out.mkdir(parents=True, exist_ok=True)

    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, 256), device=device), use_cache=True, logits_to_keep=1)  # warm-up
        for n in args.contexts:
            ids = torch.randint(0, config.vocab_size, (1, n), device=device)
            grid = [("none", 1.0)] + [(name, f) for name in args.presses for f in args.fractions]
            for name, fraction in grid:
                cache = DynamicCache()
                reset_peak(device)
                if name == "none":
                    _, prefill_s = seconds(lambda: model(ids, past_key_values=cache, logits_to_keep=1), device)
                else:
                    with PRESSES[name](round(1.0 - fraction, 6))(model):
                        _, prefill_s = seconds(lambda: model(ids, past_key_values=cache, logits_to_keep=1), device)
                peak = peak_gib(device)
                kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
                decode_ms, _ = eager_decode_ms(model, cache, ids[:, -1:], n, args.steps, device)
                ideal = (weight_bytes + kv_bytes) / bandwidth * 1e3
                row = {"kind": f"kvpress {name}, HF eager decode", "context": n, "kept_fraction": fraction,
                       "prefill_s": round(prefill_s, 3), "peak_GiB": round(peak, 2), "kv_GB": round(kv_bytes / 1e9, 3),
                       "decode_ms": round(decode_ms, 2), "ideal_ms": round(ideal, 3),
                       "ratio_to_ideal": round(decode_ms / ideal, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                out_file.write_text(json.dumps({"env": env, "rows": rows}, indent=1))  # a run cut short keeps its rows
                del cache
    write_markdown(out_file.with_suffix(".md"), env, rows)


if __name__ == "__main__":
    main()
