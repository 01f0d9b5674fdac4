"""Compile and export cost of the graph pass, recompiles across prompt lengths, and token equivalence.

For the compiled path (backend run eagerly, and through Inductor) at full budget: time of the first generate
(capture + rewrite + compile), graphs compiled for the first prompt and for 4 more prompt lengths (recompiles),
and the first new token that differs from the unmodified model (none = identical). Then export (torch.export
programs + AOTInductor packages, the latter loaded and run by a fresh process) with calibrated full budgets and
25% budgets: export time, and whether the exported programs generate the optimized model's tokens.

    python benchmarks/compile.py --model tiny --device cpu                       # seconds on a laptop CPU
    python benchmarks/compile.py --model smollm2 --device cpu --lengths 200 260 330 410 500
    python benchmarks/compile.py --model llama-small --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import FAST_POLICY  # noqa: E402

import entropykv_fx  # noqa: E402
from entropykv_fx.exported import ExportedGenerator  # noqa: E402


def load(name: str, device: str, dtype: torch.dtype):
    if name == "smollm2":
        from entropykv_fx.models import load_default_model

        tokenizer = load_default_model(dtype=dtype)[1]
        return (lambda: load_default_model(dtype=dtype, device=device, show_progress=False)[0]), tokenizer.vocab_size
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=97),
              "llama-small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)}[name]

    def fresh():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**shapes, max_position_embeddings=4096)).to(device, dtype).eval()
    return fresh, shapes["vocab_size"]


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).nonzero()
    return None if diff.numel() == 0 else int(diff[0, -1])


def margin_at(model, ids: torch.Tensor, tokens: torch.Tensor, step: int | None) -> float | None:
    """The unmodified model's top-1 minus top-2 logit where a path first chose another token (a near tie
    means the divergence is rounding, not a wrong cache)."""
    if step is None:
        return None
    with torch.no_grad():
        logits = model(torch.cat([ids, tokens[:, :step]], 1)).logits[0, -1].float()
    top = logits.topk(2).values
    return round(float(top[0] - top[1]), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2", "llama-small"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--lengths", type=int, nargs=5, default=[120, 157, 203, 260, 331])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--no-aoti", action="store_true")
    parser.add_argument("--export-fractions", type=float, nargs="*", default=[1.0, 0.25],
                        help="calibrated kept fractions to export (none: skip export)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    fresh, vocab = load(args.model, args.device, dtype)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (1, n), generator=gen).to(device) for n in args.lengths]
    new = args.new_tokens

    def greedy(model, ids):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU",
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "model": args.model, "dtype": args.dtype, "lengths": args.lengths, "new_tokens": new,
           "command": " ".join(sys.argv)}
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    reference = fresh()
    want = [greedy(reference, ids) for ids in prompts]
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every row, so a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    for inductor in [False] + ([] if args.no_inductor else [True]):
        model = entropykv_fx.optimize(fresh(), policy=FAST_POLICY, budget=1.0, inductor=inductor)
        start = time.perf_counter()
        got = [greedy(model, prompts[0])]
        first = time.perf_counter() - start
        graphs_first = len(model.entropykv.graphs)
        start = time.perf_counter()
        got += [greedy(model, ids) for ids in prompts[1:]]
        rest = (time.perf_counter() - start) / (len(prompts) - 1)
        recompiles = len(model.entropykv.graphs) - graphs_first
        sites = [r.rewritten for r in model.entropykv.graphs]
        divergence = [first_divergence(w, g) for w, g in zip(want, got)]
        row = {"path": "optimize(inductor=True)" if inductor else "optimize() (backend eager)",
               "first_generate_s": round(first, 2), "later_generate_s": round(rest, 2), "graphs_first_prompt": graphs_first,
               "recompiles_4_more_lengths": recompiles, "sites_rewritten_per_graph": sites,
               "first_divergence": divergence,
               "reference_top2_margin_there": [margin_at(reference, ids, w, d) for ids, w, d in zip(prompts, want, divergence)]}
        record(row)
        del model
    with tempfile.TemporaryDirectory() as tmp:
        n_layers = fresh().config.num_hidden_layers
        for fraction in args.export_fractions:
            cal = Path(tmp) / f"cal{fraction}.json"
            cal.write_text(json.dumps({"layer_fractions": [fraction] * n_layers}))
            model = entropykv_fx.optimize(fresh(), policy=FAST_POLICY, budget_source="calibrated",
                                          calibration_file=str(cal))
            ids = prompts[-1]
            expected = greedy(model, ids)
            out = Path(tmp) / f"export{fraction}"
            start = time.perf_counter()
            entropykv_fx.export(model, out, prompt_length=ids.shape[1], max_new_tokens=new, aoti=not args.no_aoti)
            seconds = time.perf_counter() - start
            row = {"path": f"export (calibrated {fraction:.0%})", "export_s": round(seconds, 2)}
            if fraction == 1.0:
                d = first_divergence(want[-1], expected)
                row.update(unmodified_vs_optimized_divergence=d, reference_top2_margin_there=margin_at(reference, ids, want[-1], d))
            tokens = ExportedGenerator(out, kind="pt2", trust_code=True).generate(ids, new).to(device)
            row["pt2_vs_optimized_divergence"] = first_divergence(expected, tokens)
            if not args.no_aoti:
                tokens, error = aoti_tokens_in_fresh_process(out, ids, new, Path(tmp))
                row["aoti_vs_optimized_divergence"] = error or first_divergence(expected, tokens.to(device))
            record(row)


def aoti_tokens_in_fresh_process(out: Path, ids: torch.Tensor, new: int, tmp: Path) -> tuple[torch.Tensor | None, str | None]:
    """Greedy tokens of the AOTInductor packages loaded by a new Python process (as a deployment would),
    or the reason it failed (exit status; a crash's first lines from faulthandler, else the last line of stderr)."""
    torch.save(ids.cpu(), tmp / "ids.pt")
    code = ("import json, sys, torch\nfrom entropykv_fx.exported import ExportedGenerator\n"
            f"ids = torch.load({str(tmp / 'ids.pt')!r}, weights_only=True)\n"
            f"print(json.dumps(ExportedGenerator({str(out)!r}, kind='aoti', trust_code=True).generate(ids, {new}).tolist()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        crash = [line.strip() for line in lines if line.startswith(("Fatal Python error", "  File"))][:2]
        return None, f"exit status {run.returncode}: {' / '.join(crash or lines[-1:])[:300]}"
    return torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), None


if __name__ == "__main__":
    main()
