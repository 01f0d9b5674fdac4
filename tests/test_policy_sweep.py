"""benchmarks/policy_sweep.py: each question's target as kvpress_runner.py --forced reads it, and the merged tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_models import random_prompt, tiny_model

from entropykv_fx.bench.cases import Case, Question

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import policy_sweep  # noqa: E402


class DigitTokenizer:
    """Token i reads as its number; any text encodes to [5, 6] (the tiny model's vocabulary is 97 tokens)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5, 6]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(ids) for ids in rows]


def test_run_case_writes_each_settings_prompt_feed_and_target():
    context, question = random_prompt(80, seed=3)[0].tolist(), random_prompt(7, seed=4)[0].tolist()
    case = Case("single_needle", 256, 1, 0, context, [Question(question, ["no such answer"], "?")], [], [], 4, True)
    variants = {"uniform/window": policy_sweep.VARIANTS["uniform/window"]}
    records, targets = policy_sweep.run_case(tiny_model("llama"), DigitTokenizer(), case, variants, [0.5],
                                             ["question_aware", "query_agnostic"])
    by_setting = {t["setting"]: t for t in targets}
    assert by_setting["question_aware"]["prompt_ids"] == context + question and by_setting["question_aware"]["feed"] == []
    assert by_setting["query_agnostic"]["prompt_ids"] == context and by_setting["query_agnostic"]["feed"] == question
    for t in targets:  # the full cache never says "no such answer": the target is the answer's own tokens
        assert t["target"] == [5, 6] and t["full_correct"] is False and t["split"] == "report"
        json.dumps(t)  # one JSON line each
    full = [r for r in records if r["method"] == "full"]
    assert len(full) == 2 and not any(r["correct"] for r in full)
    assert {(r["setting"], r["budget"]) for r in records if r["method"] == "uniform/window"} == {
        ("question_aware", 0.5), ("query_agnostic", 0.5)}


def sweep_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(dict(environment={"device": "test"}, model="m", cases_done=2, cases_total=2, seconds=1.0,
                                    tasks=["single_needle"], lengths=[256], records=records)))
    return path


def record(method: str, budget: float, correct: bool, case: int = 1) -> dict:
    return dict(task="single_needle", length=256, case=case, split="report", setting="question_aware", method=method,
                budget=budget, kept=budget, correct=correct)


def test_merge_puts_kvpress_rows_beside_ours(tmp_path):
    ours = sweep_json(tmp_path / "sweep_t_0.json", [record("full", 1.0, True), record("full", 1.0, True, case=3),
                                                     record("uniform/window", 0.5, True),
                                                     record("uniform/window", 0.5, False, case=3)])
    theirs = tmp_path / "kvpress_t_0.json"
    theirs.write_text(json.dumps(dict(kvpress_environment={"kvpress": "0.5.5"}, cases_done=2, cases_total=2,
                                      seconds=3.0, full_cache_reproduces_target=1.0, full_correct=2,
                                      records=[record("kvpress tova", 0.5, True), record("kvpress tova", 0.5, True, 3),
                                               record("kvpress full", 1.0, True)])))
    policy_sweep.merge([ours, theirs], tmp_path / "sweep_t")
    table = (tmp_path / "sweep_t.md").read_text()
    assert "| kvpress tova | 100.0 [" in table and "n=2" in table
    assert "| uniform/window | 50.0 [" in table
    assert "'kvpress': '0.5.5'" in table and "'full_cache_reproduces_target': 1.0" in table
    assert (tmp_path / "sweep_t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the report split's plot
    with pytest.raises(SystemExit, match="at least one policy_sweep.py JSON"):
        policy_sweep.merge([theirs], tmp_path / "only_kvpress")


def test_perplexity_case_records_each_compressed_nll_and_tabulates_the_delta(tmp_path):
    context, continuation = random_prompt(80, seed=3)[0].tolist(), random_prompt(12, seed=5)[0].tolist()
    case = Case("perplexity", 256, 1, 0, context, [Question([], [], "", continuation)], [], [], 0, False)
    variants = {"uniform/window": policy_sweep.VARIANTS["uniform/window"]}
    model = tiny_model("llama")
    records, targets = policy_sweep.run_case(model, DigitTokenizer(), case, variants, [0.5, 0.25], ["question_aware"])
    assert targets == [dict(task="perplexity", length=256, case=1, split="report", setting="perplexity",
                            prompt_ids=context, feed=[], target=continuation, full_correct=True)]
    nll = {(r["method"], r["budget"]): r["nll"] for r in records}
    assert set(nll) == {("full", 1.0), ("uniform/window", 0.5), ("uniform/window", 0.25)}
    import torch

    from entropykv_fx.bench.quality import continuation_nll
    unmodified = tiny_model("llama")  # same weights, never optimized
    with torch.no_grad():
        plain = unmodified(torch.tensor([context]), use_cache=True).past_key_values
    assert nll["full", 1.0] == pytest.approx(continuation_nll(unmodified, plain, torch.tensor([continuation])), abs=1e-5)
    assert nll["uniform/window", 0.25] != nll["full", 1.0]
    theirs = [dict(r, method="kvpress full" if r["method"] == "full" else "kvpress tova",
                   nll=r["nll"] + (0.5 if r["method"] != "full" else 0.0)) for r in records]
    lines = "\n".join(policy_sweep.nll_table(records + theirs, "report"))
    delta = nll["uniform/window", 0.25] - nll["full", 1.0]
    assert f"| uniform/window | {nll['uniform/window', 0.5] - nll['full', 1.0]:.4f} n=1 | {delta:.4f} n=1 |" in lines
    assert f"| kvpress tova | {nll['uniform/window', 0.5] - nll['full', 1.0] + 0.5:.4f} n=1 |" in lines


def test_batched_scoring_equals_each_cache_alone():
    """A stack of layer-wise and head-wise compressed copies gives each row the logits its cache alone gives, so
    the batched forced match and NLL equal the one-cache-at-a-time ones."""
    import copy

    import torch

    from entropykv_fx.bench.fanout import layer_kinds, prefill_of, scored_prefill, stacked
    from entropykv_fx.bench.quality import continuation_nll, continuation_nlls
    from entropykv_fx.compat import with_cache
    from entropykv_fx.config import EntropyKVConfig
    from entropykv_fx.reuse import continue_greedy

    model = tiny_model("llama")
    window = EntropyKVConfig(scorer="window")
    full, logits = scored_prefill(model, random_prompt(160, seed=3), window)
    variants = {n: policy_sweep.VARIANTS[n] for n in ["uniform/window", "entropy/window", "snapkv/window"]}
    compressed = list(policy_sweep.compressed_variants(full, variants, [0.5, 0.3], prefill_of(window)))
    assert len(compressed) == 6
    caches = [c for _, _, c, _ in compressed] + [copy.deepcopy(full)]
    assert len({layer_kinds(c) for c in caches}) == 2  # head-wise (snapkv) and layer-wise copies
    feed = random_prompt(5, seed=4)[0].tolist()

    def alone(cache, ids):
        return model(input_ids=torch.tensor([ids]), **with_cache(stacked([cache])), use_cache=True).logits[0]

    groups = list(policy_sweep.in_batches([(str(i), 0.5, c, None) for i, c in enumerate(caches)], rows=3))
    assert sorted(len(g) for g in groups) == [2, 2, 3] and all(len({layer_kinds(x[2]) for x in g}) == 1 for g in groups)
    for group in groups:
        rows = [c for _, _, c, _ in group]
        batch = model(input_ids=torch.tensor([feed] * len(rows)), **with_cache(stacked(rows)), use_cache=True).logits
        for i, cache in enumerate(rows):
            torch.testing.assert_close(batch[i], alone(cache, feed), atol=1e-5, rtol=1e-5)
    target = continue_greedy(model, copy.deepcopy(full), logits, 4).tolist()  # the full cache's own answer
    for first, fed in [(logits, []), (None, feed)]:
        want = target if not fed else continue_greedy(model, copy.deepcopy(full), alone(full, fed)[-1], 4).tolist()
        for kind in {layer_kinds(c) for c in caches}:
            same = [c for c in caches if layer_kinds(c) == kind]
            matches = policy_sweep.forced_matches(model, same, first, fed, want)
            assert matches == [policy_sweep.forced_matches(model, [c], first, fed, want)[0] for c in same]
        assert policy_sweep.forced_matches(model, [full], first, fed, want) == [True]  # its own greedy answer
    for kind in {layer_kinds(c) for c in caches}:  # batched greedy decoding: each row as its cache alone
        same = [c for c in caches if layer_kinds(c) == kind]
        rows = policy_sweep.greedy_rows(model, stacked(same), logits, 5)
        assert rows.tolist() == [continue_greedy(model, stacked([c]), logits, 5).tolist() for c in same]
    continuation = torch.tensor([feed])
    nlls = continuation_nlls(model, stacked(caches[:4]), continuation, rows=4)
    assert nlls == pytest.approx([continuation_nll(model, stacked([c]), continuation) for c in caches[:4]], abs=1e-5)


def test_stacked_rejects_what_cannot_share_a_batch():
    import torch

    from entropykv_fx.bench.fanout import compressed_copy, scored_prefill, stacked
    from entropykv_fx.config import EntropyKVConfig

    model = tiny_model("llama")
    one, _ = scored_prefill(model, random_prompt(100, seed=3), EntropyKVConfig(scorer="window"))
    other, _ = scored_prefill(model, random_prompt(90, seed=3), EntropyKVConfig(scorer="window"))
    head_wise, _ = compressed_copy(one, EntropyKVConfig(policy="snapkv", budget=0.5))
    layer_wise, _ = compressed_copy(one, EntropyKVConfig(policy="uniform", budget=0.5))
    with pytest.raises(ValueError, match="no caches"):
        stacked([])
    with pytest.raises(ValueError, match="different positions"):
        stacked([layer_wise, compressed_copy(other, EntropyKVConfig(policy="uniform", budget=0.5))[0]])
    with pytest.raises(ValueError, match="different kinds"):
        stacked([layer_wise, head_wise])
    two = stacked([layer_wise, layer_wise])
    two.next_positions = torch.cat([two.next_positions, two.next_positions])
    with pytest.raises(ValueError, match="one prefilled row"):
        stacked([two])


def test_length_tables_show_each_length_apart():
    records = [dict(record("full", 1.0, True), length=n) for n in (256, 512)]
    records += [dict(record("uniform/window", b, ok), length=n) for n, b, ok in
                [(256, 0.5, True), (256, 0.25, True), (512, 0.5, True), (512, 0.25, False)]]
    lines = policy_sweep.length_tables(records + [dict(record("kvpress tova", 0.5, True), length=512)], "report")
    assert "| method | 256 tokens | 512 tokens |" in lines
    assert "| uniform/window | 100 / 100 n=1 | 100 / 0 n=1 |" in lines
    assert "| kvpress tova | – | 100 / – n=1 |" in lines  # a budget it did not run shows as –
    assert policy_sweep.length_tables(records, "select") == []


def test_perplexity_case_scores_each_greedy_continuation_by_rouge_l_against_the_full_caches():
    context, continuation = random_prompt(120, seed=3)[0].tolist(), random_prompt(12, seed=5)[0].tolist()
    case = Case("perplexity", 256, 1, 0, context, [Question([], [], "", continuation)], [], [], 0, False)
    variants = {"uniform/window": policy_sweep.VARIANTS["uniform/window"]}
    records, _ = policy_sweep.run_case(tiny_model("llama"), DigitTokenizer(), case, variants, [1.0, 0.3],
                                       ["question_aware"])
    rouge = {r["budget"]: r["rouge_l"] for r in records if r["method"] == "uniform/window"}
    assert rouge[1.0] == 1.0 and 0.0 <= rouge[0.3] <= 1.0  # a full budget continues exactly as the full cache
    lines = "\n".join(policy_sweep.nll_table(records, "report"))
    assert f"| uniform/window | 100.0 n=1 | {100 * rouge[0.3]:.1f} n=1 |" in lines
    records, _ = policy_sweep.run_case(tiny_model("llama"), DigitTokenizer(), case, variants, [0.3], ["question_aware"],
                                       greedy_tokens=0)
    assert not any("rouge_l" in r for r in records) and "ROUGE" not in "\n".join(policy_sweep.nll_table(records, "report"))


def test_accuracies_and_nll_deltas_count_each_cell_against_its_own_full_cache():
    rows = [record("full", 1.0, True), record("uniform/window", 0.5, True), record("uniform/window", 0.5, False, 3),
            dict(record("uniform/window", 0.25, False), kept=0.3)]
    assert policy_sweep.accuracies(rows) == {"full": {1.0: (1, 1, 1.0)},
                                             "uniform/window": {0.5: (1, 2, 0.5), 0.25: (0, 1, 0.3)}}
    nll = [dict(record(m, b, True, case), setting="perplexity", nll=v) for m, b, case, v in
           [("full", 1.0, 1, 2.0), ("full", 1.0, 3, 3.0), ("kvpress full", 1.0, 1, 2.5), ("uniform/window", 0.5, 1, 2.25),
            ("uniform/window", 0.5, 3, 3.5), ("kvpress tova", 0.5, 1, 3.0), ("kvpress tova", 0.5, 3, 9.0)]]
    # kvpress's rows are measured against kvpress's own full cache; a case it has no full cache for is left out
    assert policy_sweep.nll_deltas(nll) == {"uniform/window": {0.5: [0.25, 0.5]}, "kvpress tova": {0.5: [0.5]}}
