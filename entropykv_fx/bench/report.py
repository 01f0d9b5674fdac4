"""Raw JSON, markdown summary and plot of a `bench quality` run. Every number printed comes from the records."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

LIBRARIES = {"entropykv_fx": "entropykv", "kvpress": "kvpress"}
REFERENCES = ("full", "none")  # each library's uncompressed cache
SETTING_TITLES = {"question_aware": "question-aware (context + question compressed together)",
                  "query_agnostic": "query-agnostic (context compressed once, then asked)"}


def _label(r: dict) -> str:
    return f"{LIBRARIES[r['library']]}/{r['method']}"


def _mean_by(records: list[dict], value: str, *keys: str) -> dict[tuple, tuple[float, int]]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if value in r:
            groups[tuple(r[k] if k != "label" else _label(r) for k in keys)].append(r[value])
    return {k: (mean(v), len(v)) for k, v in groups.items()}


def _methods(records: list[dict]) -> list[str]:
    """Row order: references first, then entropykv policies, then kvpress presses (each in first-seen order)."""
    seen = dict.fromkeys(_label(r) for r in records)
    return sorted(seen, key=lambda m: (m.split("/")[1] not in REFERENCES, not m.startswith("entropykv")))


def _fmt(cell: tuple[float, int] | None, scale: float = 100.0, digits: int = 1) -> str:
    return "–" if cell is None else f"{cell[0] * scale:.{digits}f}"


def _table(rows: list[str], columns: list[tuple], header: list[str], lookup, fmt) -> list[str]:
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for row in rows:
        cells = [fmt(lookup(row, col)) for col in columns]
        if any(c != "–" for c in cells):
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def headline(records: list[dict], setting: str, budgets: list[float]) -> list[str]:
    """The issue's targets, checked on accuracy averaged over tasks and lengths, and on NLL at 25% kept."""
    acc = _mean_by([r for r in records if r["setting"] == setting], "score", "library", "method", "budget")
    full = acc.get(("entropykv_fx", "full", 1.0))
    lines = []
    for budget in budgets:
        ours = {m: v for (lib, m, b), v in acc.items() if lib == "entropykv_fx" and b == budget}
        theirs = {m: v for (lib, m, b), v in acc.items() if lib == "kvpress" and b == budget}
        if not ours:
            continue
        best = max(ours, key=lambda m: ours[m][0])
        line = f"- {budget:.0%} kept: best entropykv `{best}` {100 * ours[best][0]:.1f}%"
        if full and budget == 0.25:
            gap = 100 * (full[0] - ours[best][0])
            line += f"; full cache {100 * full[0]:.1f}% (gap {gap:.1f} points, target ≤ 5: {'met' if gap <= 5 else 'missed'})"
        if theirs:
            rival = max(theirs, key=lambda m: theirs[m][0])
            lead = 100 * (ours[best][0] - theirs[rival][0])
            line += (f"; best kvpress `{rival}` {100 * theirs[rival][0]:.1f}% (lead {lead:+.1f} points, target ≥ 10: "
                     f"{'met' if lead >= 10 else 'missed'})")
        lines.append(line)
    return lines


def markdown(records: list[dict], meta: dict) -> str:
    env = meta["environment"]
    budgets = meta["budgets"]
    methods = _methods(records)
    kv = meta.get("kvpress")
    out = [f"# Quality benchmark: {meta['model']} ({meta['dtype']}) on {env['device']}", ""]
    if "CPU" in env["device"]:
        out += [f"**CPU fallback at reduced scale**: {meta['cases_per_task_and_length']} case(s) per task and length, "
                f"lengths {meta['lengths']}; too few cases for conclusions, the full grid is meant for a GPU (last line "
                "of the list below). Wall times depend on whatever else ran on the shared CPU: they compare nothing.", ""]
    out += [
           f"- command: `{env['command']}`",
           f"- git commit {env['git_commit']}; entropykv_fx {env['entropykv_fx']}, torch {env['torch']}, "
           f"transformers {env['transformers']}, Python {env['python']}",
           ("- kvpress {kvpress} (torch {torch}, transformers {transformers}, own venv); fan-out self-check "
            "(one shared prefill gives exactly the cache of `with press(model)`): {check}").format(
               **kv, check=kv.get("fanout_check", "not run")) if kv else "- kvpress: not run (no --kvpress-python)",
           f"- cases: {meta['cases_per_task_and_length']} per task and length; tasks {', '.join(meta['tasks'])}; "
           f"lengths {meta['lengths']} tokens; seed {meta['seed']}; budgets (kept fraction) {budgets}",
           f"- wall time: entropykv_fx {meta['entropykv_seconds']} s"
           + (f", kvpress {kv['kvpress_seconds']} s" if kv else ""),
           f"- the full grid on a GPU (after `bash benchmarks/kvpress_env.sh`): `{meta['full_grid_command']}`", ""]
    columns = [(length, b) for length in meta["lengths"] for b in [1.0] + budgets]
    header = [f"{length} @ {b:.0%}" for length, b in columns]
    for setting in meta["settings"]:
        part = [r for r in records if r["setting"] == setting]
        acc = _mean_by(part, "score", "label", "length", "budget")
        if not acc:
            continue
        out += [f"## Accuracy (%), {SETTING_TITLES[setting]}", "",
                "Mean answer recall over the needle tasks and cases; 100% = the full cache of that length.", ""]
        out += _table(methods, columns, header, lambda m, c: acc.get((m, *c)), _fmt)
        out += ["", "Targets (averaged over tasks and lengths):"] + headline(records, setting, budgets) + [""]
        tasks = [t for t in meta["tasks"] if t != "perplexity"]
        by_task = _mean_by(part, "score", "label", "task", "budget")
        task_cols = [(t, b) for b in [1.0] + budgets for t in tasks]
        out += [f"Per task (%), {setting}:", ""]
        out += _table(methods, task_cols, [f"{t} @ {b:.0%}" for t, b in task_cols], lambda m, c: by_task.get((m, *c)), _fmt)
        rouge = _mean_by(part, "rouge_l_vs_full", "label", "budget")
        out += ["", f"ROUGE-L F1 (%) of each generation against the same library's full-cache generation, {setting}:", ""]
        out += _table(methods, [(b,) for b in budgets], [f"{b:.0%}" for b in budgets], lambda m, c: rouge.get((m, *c)), _fmt)
        out.append("")
    nll = _mean_by(records, "nll", "label", "length", "budget")
    if nll:
        increase = _mean_by(records, "nll_increase", "label", "length", "budget")
        out += ["## Perplexity task (query-agnostic): mean NLL of the next 128 tokens after a compressed prefix", "",
                "Full-cache NLL in nats, then the increase (nats) at each kept fraction; target ≤ 0.03 at 25%.", ""]
        cols = [(length, b) for length in meta["lengths"] for b in [1.0] + budgets]
        out += _table(methods, cols, [f"{n} @ {b:.0%}" for n, b in cols],
                      lambda m, c: nll.get((m, *c)) if c[1] == 1.0 else increase.get((m, *c)),
                      lambda cell: _fmt(cell, 1.0, 3))
        rise = _mean_by(records, "nll_increase", "library", "method", "budget")
        for library in LIBRARIES:
            at25 = {m: v[0] for (lib, m, b), v in rise.items() if lib == library and b == 0.25}
            if at25:
                best = min(at25, key=at25.get)
                out.append(f"\n- 25% kept, smallest NLL increase of {library}: `{best}` {at25[best]:+.3f} nats"
                           + (f" (target ≤ 0.03: {'met' if at25[best] <= 0.03 else 'missed'})" if library == "entropykv_fx" else ""))
        out.append("")
    kept = _mean_by(records, "kept_fraction", "label", "budget")
    out += ["## Measured kept fraction of the KV cache (%)", ""]
    out += _table(methods, [(b,) for b in budgets], [f"asked {b:.0%}" for b in budgets], lambda m, c: kept.get((m, *c)), _fmt)
    out += ["", "Prompt lengths in tokens (min–max over cases): " + ", ".join(
        f"{length}: {min(v)}–{max(v)}" for length in meta["lengths"]
        for v in [[n for k, n in meta["prompt_tokens"].items() if k.split("/")[1] == str(length)]])]
    return "\n".join(out) + "\n"


def plot(records: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in meta["settings"] if any(r["setting"] == s and "score" in r for r in records)]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 14+ methods: tab10 would give two methods one color
        acc = _mean_by([r for r in records if r["setting"] == setting], "score", "label", "budget")
        for method in _methods(records):
            points = sorted((b, v[0] * 100) for (m, b), v in acc.items() if m == method)
            if not points:
                continue
            ours = method.startswith("entropykv")
            if method.split("/")[1] in REFERENCES:
                ax.axhline(points[0][1], color="black" if ours else "grey", linestyle=":", label=f"{method} (kept 100%)")
                continue
            ax.plot(*zip(*points), marker="o" if ours else "s", linestyle="-" if ours else "--", label=method)
        ax.set_xlabel("kept fraction of the KV cache")
        ax.set_ylabel("accuracy (%), mean over needle tasks")
        ax.set_title(setting.replace("_", "-"))
        ax.set_xticks(meta["budgets"])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{meta['model']} on {meta['environment']['device']}: {meta['cases_per_task_and_length']} cases per "
                 f"task and length, lengths {meta['lengths']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def render(json_path: str | Path) -> Path:
    """Re-write the markdown and the plot of a finished run from its JSON (the records are not touched)."""
    path = Path(json_path)
    data = json.loads(path.read_text())
    records = data.pop("records")
    md = path.with_suffix(".md")
    md.write_text(markdown(records, data))
    plot(records, data, path.with_suffix(".png"))
    return md


def write_outputs(records: list[dict], meta: dict, stem: Path) -> Path:
    """stem.json (meta + every record), stem.md, stem.png; returns the markdown path."""
    stem.with_suffix(".json").write_text(json.dumps({**meta, "records": records}, indent=0))
    md = stem.with_suffix(".md")
    md.write_text(markdown(records, meta))
    plot(records, meta, stem.with_suffix(".png"))
    return md


if __name__ == "__main__":
    import sys

    print(render(sys.argv[1]))  # python -m entropykv_fx.bench.report benchmarks/results/quality_cpu.json
