"""Seeded long-context test cases from the committed public-domain texts, in the style of RULER.

A haystack is a window of Austen's prose; "needles" are short synthetic facts planted at chosen depths. Tasks:

- `single_needle`: one key with one 7-digit value; asked for that value.
- `multi_key`: several keys with one value each; asked for one of them (the others are distractors).
- `multi_key_last`: one to three distractor keys planted before the asked one. SmolLM2-135M answers `multi_key`
  with the most recent magic number far more often than with the asked one (full cache 31-47% on the H100/H200
  sweeps), so that task measures the model more than the cache; here the full cache answers (17 of 20 on CPU at
  2k/4k with four keys) and a compressed cache that lost the asked needle still has the distractors to answer with.
- `multi_value`: one key with several values; asked for all of them (score: fraction found).
- `variable_tracking`: a chain `VAR A = 12345.`, `VAR B = VAR A.`, ...; asked for every name holding the value.
- `perplexity`: plain text; the next tokens are scored by their mean negative log-likelihood.

Every case is plain JSON holding token ids, so a second harness (kvpress, in its own environment) sees exactly the
same prompts. A case's context tokens followed by a question's tokens are the chat-formatted prompt
(question-aware setting); the context alone is what the query-agnostic setting compresses.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from ..models import text
from .arguments import TASKS

QA_TASKS = TASKS[:-1]
LENGTH_TOLERANCE = 0.01  # prompts land within 1% (or 8 tokens) of the requested length
CONTINUATION_TOKENS = 128  # tokens scored by the perplexity task
SOURCES = ("emma", "persuasion")

_ADJECTIVES = ("amber", "brisk", "calm", "dusky", "eager", "faint", "gilded", "hollow", "ivory", "jolly", "keen",
               "lunar", "mellow", "noble", "olive", "proud", "quiet", "rustic", "silver", "tawny", "umber", "vivid")
_NOUNS = ("harbor", "falcon", "meadow", "lantern", "orchard", "compass", "thistle", "quarry", "beacon", "willow",
          "garnet", "saddle", "ember", "pebble", "canyon", "riddle", "sparrow", "anchor", "violet", "crescent")
_NEEDLES = {"single_needle": 1, "multi_key": 4, "multi_key_last": (2, 4), "multi_value": 3, "variable_tracking": 3}
# One 7-digit value is 8 tokens with its period; lists need room for every item (CPU decoding is the slow part).
_MAX_NEW_TOKENS = {"single_needle": 10, "multi_key": 10, "multi_key_last": 10, "multi_value": 32, "variable_tracking": 24}


@dataclass
class Question:
    question_ids: list[int]  # rest of the chat prompt after the context (question + answer prefix)
    answers: list[str]  # every string a correct output contains
    text: str
    continuation_ids: list[int] = field(default_factory=list)  # perplexity task: the tokens scored


@dataclass
class Case:
    task: str
    length: int  # requested prompt length in tokens
    index: int
    seed: int
    context_ids: list[int]
    questions: list[Question]
    needles: list[str]  # planted sentences, in order of depth
    depths: list[float]  # where each needle starts, as a fraction of the haystack tokens
    max_new_tokens: int
    one_line: bool  # the answer is one line: generation may stop at the first line break

    @property
    def prompt_tokens(self) -> int:
        return len(self.context_ids) + len(self.questions[0].question_ids)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Case:
        return cls(**{**data, "questions": [Question(**q) for q in data["questions"]]})


_TOKENS: dict[tuple[int, str], list[int]] = {}


def _source_tokens(tokenizer, name: str) -> list[int]:
    key = (id(tokenizer), name)
    if key not in _TOKENS:
        _TOKENS[key] = tokenizer(text(name), add_special_tokens=False)["input_ids"]
    return _TOKENS[key]


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _var_names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    return rng.sample(sorted(names), n)


def _spread_depths(rng: random.Random, n: int) -> list[float]:
    """`n` sorted depths in [0.05, 0.95], at least 0.1 apart so needles never touch."""
    while True:
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(n))
        if all(b - a >= 0.1 for a, b in zip(depths, depths[1:])):
            return depths


def _needles(task: str, rng: random.Random):
    """(needle sentences, question, answer prefix, answers) for a task."""
    magic = "One of the special magic numbers for {} is: {}."
    if task in ("single_needle", "multi_key", "multi_key_last"):
        count = rng.randint(*_NEEDLES[task]) if task == "multi_key_last" else _NEEDLES[task]
        keys = _keys(rng, count)
        values = [str(rng.randint(10**6, 10**7 - 1)) for _ in keys]
        asked = len(keys) - 1 if task == "multi_key_last" else rng.randrange(len(keys))  # needles go in this order
        key = keys[asked]
        return ([magic.format(k, v) for k, v in zip(keys, values)],
                f"What is the special magic number for {key} mentioned in the provided text?",
                f"The special magic number for {key} mentioned in the provided text is", [values[asked]])
    if task == "multi_value":
        key = _keys(rng, 1)[0]
        values = [str(rng.randint(10**6, 10**7 - 1)) for _ in range(_NEEDLES[task])]
        return ([magic.format(key, v) for v in values],
                f"What are all the special magic numbers for {key} mentioned in the provided text?",
                f"The special magic numbers for {key} mentioned in the provided text are", values)
    if task == "variable_tracking":
        names = _var_names(rng, _NEEDLES[task])
        value = str(rng.randint(10**4, 10**5 - 1))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return (chain, f"Find all variables that are assigned the value {value} in the text above.",
                f"According to the chain of variable assignments in the text above, {len(names)} variables are "
                f"assigned the value {value}; they are:", names)
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def _chat_split(tokenizer, context: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat prompt, split where the context ends (the rest: question, answer prefix)."""
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix
    cut = prompt.index(context) + len(context)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(prompt[:cut]), encode(prompt[cut:])


def _haystack_with_needles(tokenizer, window: list[int], needles: list[str], depths: list[float]) -> str:
    cuts = [int(len(window) * d) for d in depths]
    pieces, start = [], 0
    for cut, needle in zip(cuts, needles):
        pieces += [tokenizer.decode(window[start:cut]), needle]
        start = cut
    pieces.append(tokenizer.decode(window[start:]))
    return " ".join(p.strip() for p in pieces)


def make_case(tokenizer, task: str, length: int, index: int, seed: int = 0) -> Case:
    """One case of `task` whose prompt is `length` tokens (within LENGTH_TOLERANCE); deterministic in its arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if length < 256:
        raise ValueError(f"length must be >= 256 tokens, got {length}")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")  # str seeds are hashed deterministically
    source = _source_tokens(tokenizer, rng.choice(SOURCES))
    need = length + 2 * CONTINUATION_TOKENS
    if need > len(source):
        raise ValueError(f"length {length} is longer than the committed texts allow ({len(source) - 2 * CONTINUATION_TOKENS})")
    offset = rng.randrange(len(source) - need)
    if task == "perplexity":
        return Case(task, length, index, seed, source[offset:offset + length],
                    [Question([], [], "", source[offset + length:offset + length + CONTINUATION_TOKENS])],
                    [], [], 0, False)
    needles, question, answer_prefix, answers = _needles(task, rng)
    depths = _spread_depths(rng, len(needles))
    haystack = length
    for _ in range(4):  # the joins re-tokenize slightly differently: correct the haystack size until it fits
        context = _haystack_with_needles(tokenizer, source[offset:offset + haystack], needles, depths)
        context_ids, question_ids = _chat_split(tokenizer, context, question, answer_prefix)
        error = len(context_ids) + len(question_ids) - length
        if abs(error) <= _tolerance(length):
            break
        haystack -= error
    return Case(task, length, index, seed, context_ids, [Question(question_ids, answers, question)], needles,
                depths, _MAX_NEW_TOKENS[task], task in ("single_needle", "multi_key", "multi_key_last"))


def _tolerance(length: int) -> int:
    return max(8, int(LENGTH_TOLERANCE * length))


def make_cases(tokenizer, tasks: list[str], lengths: list[int], n_cases: int, seed: int = 0) -> list[Case]:
    return [make_case(tokenizer, task, length, i, seed) for task in tasks for length in lengths for i in range(n_cases)]


def stop_token_ids(tokenizer) -> dict[str, list[int]]:
    """Tokens that end an answer: 'eos' (end of sequence) and 'line' (eos or any token holding a line break)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    line = {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    return {"eos": eos, "line": sorted(line.union(eos))}
