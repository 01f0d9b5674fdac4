"""The quality benchmark's parts: case generators, scorers, one-prefill fan-out, and reuse of a compressed cache."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.headwise import HeadwiseLayer
from entropykv_fx.bench.cases import LENGTH_TOLERANCE, QA_TASKS, Case, _source_tokens, make_case
from entropykv_fx.bench.fanout import compressed_copy, scored_prefill
from entropykv_fx.bench.scoring import answer_recall, lcs_length, rouge_l
from entropykv_fx.cli import main
from entropykv_fx.reuse import ask, compress_context


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from entropykv_fx.models import cache_dir, gguf_path

    if (cache_dir() / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache_dir())
    pytest.importorskip("gguf")
    src = gguf_path()
    return AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)


@pytest.mark.parametrize("task", QA_TASKS + ("perplexity",))
def test_cases_are_deterministic_for_a_seed(tokenizer, task):
    a, b = make_case(tokenizer, task, 1024, 3, seed=7), make_case(tokenizer, task, 1024, 3, seed=7)
    assert a == b
    assert Case.from_json(a.to_json()) == a
    assert make_case(tokenizer, task, 1024, 3, seed=8).context_ids != a.context_ids
    assert make_case(tokenizer, task, 1024, 4, seed=7).context_ids != a.context_ids


@pytest.mark.parametrize("task", QA_TASKS)
@pytest.mark.parametrize("length", [1024, 2048])
def test_needles_are_in_the_context_at_their_depths(tokenizer, task, length):
    case = make_case(tokenizer, task, length, 0)
    assert abs(case.prompt_tokens - length) <= max(8, LENGTH_TOLERANCE * length)
    context = tokenizer.decode(case.context_ids)
    haystack_start = context.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    needle_tokens = sum(len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in case.needles)
    haystack_tokens = len(case.context_ids) - len(tokenizer(context[:haystack_start])["input_ids"]) - needle_tokens
    for i, (needle, depth) in enumerate(zip(case.needles, case.depths)):
        at = context.index(needle)
        before = len(tokenizer(context[haystack_start:at], add_special_tokens=False)["input_ids"])
        earlier_needles = sum(len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in case.needles[:i])
        assert abs((before - earlier_needles) / haystack_tokens - depth) < 0.02, (needle, depth)
    question = case.questions[0]
    assert all(any(answer in needle for needle in case.needles) for answer in question.answers)
    assert not any(answer in tokenizer.decode(question.question_ids) for answer in question.answers
                   if task != "variable_tracking")  # the question names the key (or the value), never the answer


def test_multi_key_last_plants_its_distractors_before_the_asked_needle(tokenizer):
    counts = set()
    for index in range(12):
        case = make_case(tokenizer, "multi_key_last", 1024, index)
        counts.add(len(case.needles))
        asked = case.questions[0]
        keys = [needle.split(" for ")[1].split(" is")[0] for needle in case.needles]
        assert case.depths == sorted(case.depths) and asked.answers[0] in case.needles[-1]
        assert keys[-1] in asked.text and not any(key in asked.text for key in keys[:-1])
        assert len(set(keys)) == len(keys)
    assert counts == {2, 3, 4}  # one to three distractors


def test_perplexity_case_continues_its_context_in_the_source_text(tokenizer):
    case = make_case(tokenizer, "perplexity", 1024, 0)
    assert len(case.context_ids) == 1024 and len(case.questions[0].continuation_ids) == 128
    ids = case.context_ids + case.questions[0].continuation_ids
    found = [name for name in ("emma", "persuasion") for source in [_source_tokens(tokenizer, name)]
             if any(source[i:i + len(ids)] == ids for i in range(len(source) - len(ids)) if source[i] == ids[0])]
    assert len(found) == 1  # context and continuation are one contiguous stretch of one text


def test_bad_case_requests_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown task"):
        make_case(tokenizer, "summarize", 1024, 0)
    with pytest.raises(ValueError, match="longer than the committed texts"):
        make_case(tokenizer, "single_needle", 10**7, 0)


def test_answer_recall_accepts_whole_answers_only():
    assert answer_recall("The number is 1234567.", ["1234567"]) == 1.0
    assert answer_recall("12345678", ["1234567"]) == 0.0  # a longer number is another number
    assert answer_recall("123456", ["1234567"]) == 0.0
    assert answer_recall("abcde and QWERT", ["QWERT", "ASDFG"]) == 0.5
    assert answer_recall("qwert, asdfg", ["QWERT", "ASDFG"]) == 1.0
    with pytest.raises(ValueError):
        answer_recall("anything", [])


def test_rouge_l_on_known_pairs():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)  # P=1, R=5/6
    assert rouge_l("dogs bark", "the cat sat") == 0.0
    assert rouge_l("Mat the, CAT!", "the cat mat") == pytest.approx(2 / 3)  # LCS 'the cat' of 3 and 3 words
    assert rouge_l("", "") == 1.0 and rouge_l("", "word") == 0.0


def held(layer) -> list[torch.Tensor]:
    """Everything a cache layer holds: per head for the head-wise layout, else keys, values, positions."""
    if isinstance(layer, HeadwiseLayer):
        return [t for head in layer.heads for t in (*head.tensors(), head.positions)]
    return [layer.keys, layer.values, layer.positions]


@pytest.mark.parametrize("policy", sorted(entropykv_fx.policies()))
def test_fanout_copy_equals_compressing_during_prefill(policy):
    model = tiny_model("llama")
    prompt = random_prompt(200)
    shared, logits = scored_prefill(model, prompt, entropykv_fx.EntropyKVConfig(policy=policy))  # its own scorer's
    for budget in (0.5, 0.25):
        cache, report = compressed_copy(shared, entropykv_fx.EntropyKVConfig(policy=policy, budget=budget))
        entropykv_fx.optimize(model, policy=policy, budget=budget)
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        direct = out.past_key_values
        assert torch.equal(out.logits[0, -1], logits)
        assert report.kept_fraction == entropykv_fx.report(model).kept_fraction
        for mine, theirs in zip(cache.layers, direct.layers):
            for a, b in zip(held(mine), held(theirs), strict=True):
                assert torch.equal(a, b)
    assert all(layer.get_seq_length() == 200 for layer in shared.layers)  # the shared prefill is left whole


def test_compressed_copy_needs_a_scored_prefill():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="full")
    with pytest.raises(ValueError, match="scored_prefill"):
        compressed_copy(compress_context(model, random_prompt(50)), entropykv_fx.EntropyKVConfig())


def test_compressed_copy_refuses_a_config_that_ranks_by_other_scores():
    shared, _ = scored_prefill(tiny_model("llama"), random_prompt(60), entropykv_fx.EntropyKVConfig(policy="uniform"))
    with pytest.raises(ValueError, match=r"scored for .*'window'.* ranks by \('reconstruct'"):
        compressed_copy(shared, entropykv_fx.EntropyKVConfig(policy="cache_topk"))  # its own scorer: reconstruct
    compressed_copy(shared, entropykv_fx.EntropyKVConfig(policy="streaming"))  # ranks by position: any prefill


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_asking_a_reused_full_cache_equals_plain_generate(arch):
    model = entropykv_fx.optimize(tiny_model(arch), policy="full")
    context, question = random_prompt(60, seed=2), random_prompt(9, seed=3)
    with torch.no_grad():
        plain = model.generate(torch.cat([context, question], 1), max_new_tokens=12, do_sample=False)[0, 69:]
    cache = compress_context(model, context)
    assert ask(model, cache, question, max_new_tokens=12).tolist() == plain.tolist()
    # ask used a copy; a sliding-window layer (Mistral's, 24) holds only what a later query can attend
    held = [min(60, w - 1) if w else 60 for w in model.entropykv.sliding_windows]
    assert cache.get_seq_length() == 60 and cache.physical_lengths() == held


def test_compressed_context_answers_every_question_from_the_same_cache():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="entropy", budget=0.5)
    cache = compress_context(model, random_prompt(120, seed=4))
    assert max(cache.physical_lengths()) < 120
    q1, q2 = random_prompt(6, seed=5), random_prompt(6, seed=6)
    first = ask(model, cache, q1, max_new_tokens=8)
    ask(model, cache, q2, max_new_tokens=8)
    assert ask(model, cache, q1, max_new_tokens=8).tolist() == first.tolist()
    stop = int(first[2])
    assert ask(model, cache, q1, max_new_tokens=8, stop_token_ids=[stop]).tolist() == first[:first.tolist().index(stop) + 1].tolist()


def test_reuse_rejects_batches_and_empty_questions():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="full")
    with pytest.raises(ValueError, match=r"shape \[1, n\]"):
        compress_context(model, random_prompt(10, batch=2))
    cache = compress_context(model, random_prompt(10))
    with pytest.raises(ValueError, match="question_ids"):
        ask(model, cache, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ask(model, cache, random_prompt(3), 0)


def test_bench_quality_cli_refuses_bad_settings(capsys):
    assert main(["bench", "quality", "--policies", "nonexistent"]) == 2
    assert "unknown policies ['nonexistent']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--budgets", "1.5"])
    assert "kept fractions in (0, 1)" in capsys.readouterr().err


def _kvpress_args(python: str):
    import argparse

    return argparse.Namespace(kvpress_python=python, budgets=[0.5, 0.25], settings=["question_aware"],
                              kvpress_presses=["snapkv"], device="cpu", dtype="float32", tag="t")


def test_kvpress_runs_alongside_with_half_the_cpu_threads(tmp_path, monkeypatch):
    import sys

    from entropykv_fx.bench import quality

    fake = tmp_path / "fake_runner.py"  # stands in for kvpress_runner.py: echoes its arguments and thread limit
    fake.write_text("import json, os, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                    "json.dump({'records': [], 'argv': sys.argv[1:], 'threads': os.environ['OMP_NUM_THREADS']}, open(out, 'w'))\n")
    monkeypatch.setattr(quality, "RUNNER", fake)
    threads = torch.get_num_threads()
    try:
        process, out_file = quality.start_kvpress(_kvpress_args(sys.executable), tmp_path / "cases.json",
                                                  tmp_path / "model", tmp_path)
        mine = torch.get_num_threads()
        result = quality.finish_kvpress(process, out_file)
    finally:
        torch.set_num_threads(threads)
    assert out_file == tmp_path / "kvpress_t.json"
    assert int(result["threads"]) + mine == max(2, threads)
    assert result["argv"][result["argv"].index("--budgets") + 1:][:2] == ["0.5", "0.25"]
    assert result["argv"][result["argv"].index("--cases") + 1] == str(tmp_path / "cases.json")


def test_a_failing_kvpress_run_is_an_error_not_missing_rows(tmp_path, monkeypatch):
    import subprocess
    import sys

    from entropykv_fx.bench import quality

    fake = tmp_path / "failing_runner.py"
    fake.write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(quality, "RUNNER", fake)
    threads = torch.get_num_threads()
    try:
        process, out_file = quality.start_kvpress(_kvpress_args(sys.executable), tmp_path / "c.json",
                                                  tmp_path, tmp_path)
        with pytest.raises(subprocess.CalledProcessError):
            quality.finish_kvpress(process, out_file)
    finally:
        torch.set_num_threads(threads)


def test_report_rerenders_a_committed_run_with_its_numbers(tmp_path):
    import shutil
    from pathlib import Path

    from entropykv_fx.bench.report import render

    run = tmp_path / "quality_cpu_grid.json"
    shutil.copy(Path(__file__).parents[1] / "benchmarks/results/quality_cpu_grid.json", run)
    markdown = render(run).read_text()
    assert "| entropykv/uniform | – | 45.8 | 0.0 | 0.0 |" in markdown  # question-aware accuracy at 50/25/10%
    assert "`matrix_entropy` +0.021 nats (target ≤ 0.03: met)" in markdown
    assert (tmp_path / "quality_cpu_grid.png").stat().st_size > 10_000
