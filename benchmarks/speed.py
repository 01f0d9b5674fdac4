"""Speed and memory on the GPU (issue 7): a Llama-3-8B-shaped model with random bf16 weights (nothing to download).

    python benchmarks/speed.py --out benchmarks/results --tag h100            # the H100 grid
    python benchmarks/speed.py --shape tiny --device cpu --contexts 64 128    # a smoke run without a GPU

Per context length (batch 1):
  prefill: HF SDPA with a full cache vs `entropykv_fx.optimize()` (its prefill scores, selects and gathers, so the
    difference is the compression overhead), wall time and peak memory;
  decode ms/token, four ways: HF eager over its full DynamicCache; `optimize()`'s eager decode over the
    compressed cache; and `entropykv_fx.StaticDecoder` (the model's own modules, KV written in place into
    preallocated buffers, attention by `entropykv::attention` / `attention_int8`) replayed from a CUDA graph,
    over the full cache and over the compressed caches (bf16, and int8 with per-token scales) at each fraction;
    at --inductor-contexts also that step compiled by Inductor before capture (`StaticDecoder(inductor=True)`).
Next to each CUDA-graph decode: the bandwidth ideal, (weights read + KV read) / copy bandwidth measured in this run.
Throughput at 32k: the static step over caches of the kept size filled with random values (decode time does not
depend on the values), from batch 1 up to the largest batch whose cache fits in the free memory.
kvpress does not run here (it needs transformers < 5.3): benchmarks/kvpress_speed.py times it in its own venv.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

# The repository root instead of this folder, whose kernels.py would shadow the `kernels` package transformers probes.
sys.path[0] = str(Path(__file__).resolve().parents[1])
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import entropykv_fx  # noqa: E402
from entropykv_fx.compat import cache_of  # noqa: E402
from entropykv_fx.decode import StaticDecoder  # noqa: E402
from benchmarks.timing import (FAST_POLICY, SHAPES, cuda_ms, eager_decode_ms, peak_gib, random_llama, reset_peak,  # noqa: E402
                               run_environment, seconds, write_markdown)


def step_ms(decoder: StaticDecoder, steps: int, device: torch.device) -> float:
    """ms per step: CUDA-graph replays on a GPU, plain calls on a CPU; the decoder is rewound afterwards."""
    run = decoder.compiled()
    with torch.no_grad():
        run()  # one untimed step
        if device.type != "cuda":
            ms = seconds(lambda: [run() for _ in range(steps)], device)[1] / steps * 1e3
        else:
            ms = cuda_ms(run, steps)
    decoder.rewind()
    return ms


def first_logits(model, caches, token: Tensor) -> Tensor:
    """The static step's logits for `token` right after the cache."""
    decoder = StaticDecoder(model, caches, max_new_tokens=1)
    decoder.token.copy_(token)
    with torch.no_grad():
        return decoder.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=int, nargs="+", default=[131072, 65536, 32768, 8192],
                        help="largest first, so that a run cut short keeps the headline rows")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--inductor-contexts", type=int, nargs="*", default=[131072, 8192],
                        help="contexts where the static step is also timed compiled by Inductor (a compile each)")
    parser.add_argument("--batch-context", type=int, default=32768, help="0: no batch sweep")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="h100")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only redraw the plots of a finished run's JSON")
    parser.add_argument("--smollm2", action="store_true",
                        help="instead: SmolLM2-135M decode tokens/s, HF eager generate vs StaticDecoder")
    args = parser.parse_args()
    if args.smollm2:
        smollm2_decode(args)
        return
    if args.plot:
        run = json.loads(args.plot.read_text())
        plot(run["env"], run["rows"], args.plot.with_suffix(""))
        return
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = random_llama(args.shape, device, max(args.contexts))
    config = model.config
    with torch.device("meta"):  # a second model object on the same weights, for optimize()
        optimized = LlamaForCausalLM(config).eval()
    optimized.load_state_dict(model.state_dict(), assign=True)
    optimized.model.rotary_emb = model.model.rotary_emb  # its inv_freq buffer is not in the state dict
    entropykv_fx.optimize(optimized, policy=FAST_POLICY, budget=args.fractions[0])

    env, bandwidth, weight_bytes = run_environment(device, args.shape, model)
    env["transformers"] = transformers.__version__
    print(json.dumps(env), flush=True)
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)  # after every row, so a run cut short keeps what it measured
        (args.out / f"speed_{args.tag}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))

    def ideal_ms(kv_bytes: int) -> float:
        return (weight_bytes + kv_bytes) / bandwidth * 1e3

    def graph_row(kind: str, n: int, fraction: float, batch: int, caches, int8: bool, extra: dict,
                  room: int | None = None, inductor: bool = False) -> None:
        room = args.steps + 1 if room is None else room
        decoder = StaticDecoder(model, caches, max_new_tokens=room, int8=int8, copy=room > 0, inductor=inductor)
        kind = kind.replace("CUDA graph", "CUDA graph" if device.type == "cuda" else "eager (no GPU)")
        ms = step_ms(decoder, args.steps, device)
        row = {"kind": kind, "context": n, "kept_fraction": fraction, "batch": batch,
               "storage": "int8" if int8 else "bf16", "kv_GB": round(decoder.kv_bytes / 1e9, 3),
               "decode_ms": round(ms, 3), "tokens_per_s": round(batch / ms * 1e3, 1),
               "ideal_ms": round(ideal_ms(decoder.kv_bytes), 3),
               "ratio_to_ideal": round(ms / ideal_ms(decoder.kv_bytes), 3), **extra}
        record(row)

    with torch.no_grad():  # compile optimize()'s graphs: static shapes first, then dynamic ones (no recompile after)
        for warm in (256, 300):
            ids = torch.randint(0, config.vocab_size, (1, warm), device=device)
            model(ids, use_cache=True, logits_to_keep=1)
            eager_decode_ms(optimized, cache_of(optimized(ids, use_cache=True, logits_to_keep=1)), ids[:, -1:],
                            warm, 1, device)
    for n in args.contexts:
        ids = torch.randint(0, config.vocab_size, (1, n), device=device)
        token = ids[:, -1:]
        reset_peak(device)
        with torch.no_grad():
            out, prefill_s = seconds(lambda: model(ids, use_cache=True, logits_to_keep=1), device)
        full_peak, full_prefill_s = peak_gib(device), prefill_s
        full_cache = cache_of(out)
        hf_ms, hf_first = eager_decode_ms(model, full_cache, token, n, 3, device)
        record({"kind": "prefill + HF eager decode, full cache", "context": n, "prefill_s": round(prefill_s, 3),
                "peak_GiB": round(full_peak, 2), "decode_ms": round(hf_ms, 2)})
        caches = [(layer.keys[:, :, :n], layer.values[:, :, :n], torch.arange(n, device=device)[None])
                  for layer in full_cache.layers]
        del out, full_cache
        static_first = first_logits(model, caches, token)
        graph_row("static decode, CUDA graph, full cache", n, 1.0, 1, caches, False, agreement(static_first, hf_first, "hf"))
        if n in args.inductor_contexts:
            graph_row("static decode, Inductor + CUDA graph, full cache", n, 1.0, 1, caches, False, {}, inductor=True)
        del caches

        first_call = {}
        for fraction in args.fractions:
            entropykv_fx.optimize(optimized, policy=FAST_POLICY, budget=fraction)  # budgets apply after the graphs: no recompile
            with torch.no_grad():
                if not first_call:  # a new length's first call costs more (kernel specializations): not timed below
                    _, first_s = seconds(lambda: optimized(ids, use_cache=True, logits_to_keep=1), device)
                    first_call = {"first_call_at_this_length_s": round(first_s, 3)}
                reset_peak(device)
                out, prefill_s = seconds(lambda: optimized(ids, use_cache=True, logits_to_keep=1), device)
            peak = peak_gib(device)
            cache = cache_of(out)
            compressed = [(layer.keys, layer.values, layer.positions) for layer in cache.layers]
            kept = sum(k.shape[2] for k, _, _ in compressed) / (n * len(compressed))
            opt_ms, opt_first = eager_decode_ms(optimized, cache, token, n, 3, device)
            record({"kind": "prefill + optimize() eager decode", "context": n, "kept_fraction": round(kept, 4),
                    "prefill_s": round(prefill_s, 3), "prefill_overhead_vs_full": round(prefill_s / full_prefill_s - 1, 4),
                    "peak_GiB": round(peak, 2),
                    "peak_vs_full": round(peak / full_peak, 3) if device.type == "cuda" else None,
                    "decode_ms": round(opt_ms, 2), **first_call})
            del out, cache
            for int8 in (False, True):
                extra = {}
                if not int8:
                    extra = agreement(first_logits(model, compressed, token), opt_first, "optimize")
                graph_row("static decode, CUDA graph, compressed", n, round(kept, 4), 1, compressed, int8, extra)
            if n in args.inductor_contexts:
                graph_row("static decode, Inductor + CUDA graph, compressed", n, round(kept, 4), 1, compressed, False,
                          {}, inductor=True)
            del compressed

    if args.batch_context:
        batch_sweep(args, model, config, device, graph_row)
    write_markdown(args.out / f"speed_{args.tag}.md", env, rows)
    plot(env, rows, args.out / f"speed_{args.tag}")


def agreement(logits: Tensor, reference: Tensor, name: str) -> dict:
    """Does the static step's first token match `reference`'s, and how far apart are the logits."""
    diff = float((logits.float() - reference.float()).abs().max())
    return {f"first_token_equal_to_{name}": bool((logits.argmax(-1) == reference.argmax(-1)).all()),
            f"logits_max_abs_diff_vs_{name}": round(diff, 4),
            f"logits_max_abs_{name}": round(float(reference.float().abs().max()), 3)}


def smollm2_decode(args) -> None:
    """Decode tokens/s of the embedded SmolLM2-135M-Instruct on a ~2k-token prompt: HF eager `generate()` (full
    cache), `optimize()`'s `generate()` and `StaticDecoder` over the same compressed cache; tokens compared."""
    from entropykv_fx.demo import needle_prompt
    from entropykv_fx.models import load_default_model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_default_model(dtype, device, show_progress=False)
    inputs = needle_prompt(tokenizer, 2000, 0.5).to(device)
    n, new = inputs["input_ids"].shape[1], args.steps + 1
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU",
           "torch": torch.__version__, "transformers": transformers.__version__, "model": "SmolLM2-135M-Instruct",
           "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": n, "new_tokens": new,
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}

    def decode_rate(fn) -> tuple[float, Tensor]:
        """tokens/s of the decode steps: (time of `new` tokens - time of 1) / (new - 1), after a warm-up."""
        fn(2)  # compiles optimize()'s prefill and decode graphs, captures the CUDA graph
        _, one = seconds(lambda: fn(1), device)
        tokens, total = seconds(lambda: fn(new), device)
        return (new - 1) / (total - one), tokens

    def generate(m, forced: bool = True):  # forced: no end-of-sequence before k tokens, so each call decodes k
        return lambda k: m.generate(**inputs, max_new_tokens=k, min_new_tokens=k if forced else 0, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)[:, n:]
    with torch.no_grad():
        hf_rate, _ = decode_rate(generate(model))
        entropykv_fx.optimize(model, policy="uniform", budget=args.fractions[0])
        opt_rate, _ = decode_rate(generate(model))
        want = generate(model, forced=False)(new)  # greedy up to end-of-sequence: what StaticDecoder must match
        out = model(**inputs, use_cache=True)
        first = out.logits[:, -1:].argmax(-1)
        decoder = StaticDecoder(model, cache_of(out), max_new_tokens=2 * new)

        def static(k):
            decoder.rewind()
            return torch.cat([first, decoder.generate(first, k - 1)], 1) if k > 1 else first
        static_rate, got = decode_rate(static)
    rows = [{"path": "HF eager generate, full cache", "decode_tokens_per_s": round(hf_rate, 1)},
            {"path": f"optimize() generate, uniform {args.fractions[0]:.0%}", "decode_tokens_per_s": round(opt_rate, 1)},
            {"path": f"StaticDecoder, same cache{', CUDA graph' if device.type == 'cuda' else ''}",
             "decode_tokens_per_s": round(static_rate, 1),
             "tokens_equal_to_optimize_generate": bool(torch.equal(got[:, :want.shape[1]], want))}]
    print(json.dumps(env))
    for row in rows:
        print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"speed_{args.tag}_smollm2.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


def random_caches(config: LlamaConfig, batch: int, slots: int, room: int, device: torch.device) -> list[tuple[Tensor, ...]]:
    """Per layer: `slots` random keys/values at positions 0.., then `room` empty slots."""
    d = config.hidden_size // config.num_attention_heads
    positions = torch.arange(slots + room, device=device).masked_fill(torch.arange(slots + room, device=device) >= slots, -1)
    shape = (batch, config.num_key_value_heads, slots + room, d)
    return [(torch.randn(shape, device=device, dtype=torch.bfloat16), torch.randn(shape, device=device, dtype=torch.bfloat16),
             positions.expand(batch, -1).contiguous()) for _ in range(config.num_hidden_layers)]


def batch_sweep(args, model, config, device, graph_row) -> None:
    """Tokens/s at `batch_context` from batch 1 to the largest batch whose cache fits in the free memory."""
    n, room = args.batch_context, args.steps + 2
    d = config.hidden_size // config.num_attention_heads
    for fraction in (1.0, *args.fractions):
        slots = max(1, round(fraction * n))
        per_seq = 2 * config.num_hidden_layers * config.num_key_value_heads * (slots + room) * d * 2
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info()[0] - (6 << 30)  # room for activations and the graph's pool
            largest = max(1, int(free // per_seq))
        else:
            largest = 4
        for batch in sorted({1, 8, 32, largest} & set(range(1, largest + 1))):
            caches = random_caches(config, batch, slots, room, device)
            graph_row("static decode, CUDA graph, random cache (batch sweep)", n, fraction, batch, caches, False,
                      {"largest_batch": batch == largest}, room=0)
            del caches


def plot(env: dict, rows: list[dict], stem: Path) -> None:
    """STEM_decode.png: decode ms/token vs context per cache; STEM_batch.png: tokens/s vs batch at one context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{env['shape']} bf16, {env['device']}"
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row.get("batch", 1) != 1 or "decode_ms" not in row or "batch sweep" in row["kind"]:
            continue
        label = row["kind"] if "kept_fraction" not in row else \
            f"{row['kind']} {row['kept_fraction']:.0%} {row.get('storage', '')}".strip()
        series.setdefault(label, []).append((row["context"], row["decode_ms"]))
        if "ideal_ms" in row and row.get("storage") == "bf16":
            series.setdefault(f"bandwidth ideal {row['kept_fraction']:.0%}", []).append((row["context"], row["ideal_ms"]))
    for label, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, ":" if label.startswith("bandwidth") else "-o", label=label, markersize=4)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode ms/token", title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(f"{stem}_decode.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    sweep: dict[float, list[tuple[int, float]]] = {}
    for row in rows:
        if "batch sweep" in row["kind"]:
            sweep.setdefault(row["kept_fraction"], []).append((row["batch"], row["tokens_per_s"]))
    for fraction, points in sweep.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "-o", label=f"{fraction:.0%} kept (largest batch {max(xs)})")
    context = next((row["context"] for row in rows if "batch sweep" in row["kind"]), "?")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s", title=f"{title}, {context} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}_batch.png", dpi=120)


if __name__ == "__main__":
    main()
