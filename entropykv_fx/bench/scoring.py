"""Scorers of the quality benchmark: RULER's string match and ROUGE-L F1 (agreement with the full cache)."""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def answer_recall(output: str, answers: list[str]) -> float:
    """Fraction of `answers` found in `output` as whole words (case-insensitive): 1234567 is not in 12345678."""
    if not answers:
        raise ValueError("answer_recall needs at least one expected answer")
    found = sum(bool(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", output, re.IGNORECASE)) for a in answers)
    return found / len(answers)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the dynamic program at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens; two empty texts agree fully (1.0)."""
    cand, ref = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not cand or not ref:
        return float(cand == ref)
    common = lcs_length(cand, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)
