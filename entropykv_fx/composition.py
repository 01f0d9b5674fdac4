"""Policies as typed compositions: an allocator x a scorer x a granularity.

The allocator decides how many prompt tokens each layer (or each KV head) keeps, the scorer which tokens fill
those budgets, the granularity whether every KV head of a layer keeps the same token set ("layer") or its own
("head", the ragged head-wise layout of `entropykv_fx.headwise`). Each part is a small frozen dataclass owning
its parameters; a `Composition` of three parts is accepted wherever a policy name is::

    from entropykv_fx import Composition, LayerEntropy, LastQuery, optimize
    optimize(model, policy=Composition(LayerEntropy(max_layer_budget=2.0), LastQuery()), budget=0.25)

The registry's names are tested compositions (`COMPOSITIONS`, `Composition.named`): `optimize(model,
policy="entropy")` and `optimize(model, policy=Composition.named("entropy"))` build equal configs. Parameters
every composition shares stay on `EntropyKVConfig`: `budget` (fraction of the prompt, or tokens per layer on
average), `window` (the last prompt queries measure attention, and those tokens are always kept) and
`sink_tokens`. A composition that no registered policy implements (e.g. `HeadTopK` at layer granularity) is
refused with the granularities its allocator has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Granularity = Literal["layer", "head"]


class _Part:
    """A scorer or an allocator: its dataclass fields are `EntropyKVConfig` fields of the same names."""

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------- scorers
@dataclass(frozen=True)
class Window(_Part):
    """SnapKV's observation window (Li et al. 2024, https://arxiv.org/abs/2404.14469): a token scores the
    attention mass the last `window` prompt queries give it, smoothed along the sequence by `pooling` ("max",
    "avg" or "none") over `pool_kernel` tokens (odd) so that a kept token keeps its neighbours."""

    pooling: Literal["max", "avg", "none"] = "max"
    pool_kernel: int = 7
    name: ClassVar[str] = "window"


@dataclass(frozen=True)
class LastQuery(_Part):
    """TOVA (Oren et al. 2024, https://arxiv.org/abs/2401.06104): a token scores the attention the last prompt
    query gives it (mean over heads), unpooled."""

    name: ClassVar[str] = "last_query"


@dataclass(frozen=True)
class KeyNorm(_Part):
    """Knorm (Devoto et al. 2024, https://arxiv.org/abs/2406.11430): a token scores the negated L2 norm of its
    key (low-norm keys draw attention). Needs no attention; not comparable across layers, so `CacheTopK` refuses it."""

    name: ClassVar[str] = "key_norm"


@dataclass(frozen=True)
class Reconstruct(_Part):
    """KVzip's context reconstruction (Kim et al. 2025, https://arxiv.org/abs/2505.23416): the prefill is one
    forward over the prompt and its repetition in chunks of `reconstruct_chunk` tokens, each chunk seeing the prompt
    up to its own end (`entropykv_fx.reconstruct`), and a token scores the most attention it receives while the
    model re-reads the prompt (max over queries and heads). Independent of what is asked next; a forward over twice
    the prompt. `repeat_prompt`: token ids before each repeated chunk (`repeat_prompt_ids`)."""

    repeat_prompt: tuple[int, ...] = ()
    reconstruct_chunk: int = 1024
    name: ClassVar[str] = "reconstruct"


Scorer = Window | LastQuery | KeyNorm | Reconstruct
SCORER_TYPES: dict[str, type] = {cls.name: cls for cls in (Window, LastQuery, KeyNorm, Reconstruct)}


# -------------------------------------------------------------------------------------------------- allocators
@dataclass(frozen=True)
class Uniform(_Part):
    """The same budget in every layer and KV head (SnapKV's allocation, https://arxiv.org/abs/2404.14469)."""

    policies: ClassVar[dict[str, str]] = {"head": "snapkv", "layer": "uniform"}  # the first is the default


@dataclass(frozen=True)
class LayerEntropy(_Part):
    """Per-layer budgets proportional to the layer's mean head attention entropy over the observation window
    (Kim & Jung 2025, *Entropy-Guided KV Caching for Efficient LLM Inference*, `seeds/001`); each layer clamped to
    [`min_layer_budget`, `max_layer_budget`] x the mean budget (multiples of it, not tokens)."""

    min_layer_budget: float = 0.25
    max_layer_budget: float = 4.0
    policies: ClassVar[dict[str, str]] = {"layer": "entropy", "head": "entropy_per_head"}


@dataclass(frozen=True)
class LayerFocus(_Part):
    """Per-layer budgets proportional to log(n) - the layer's mean head attention entropy over the observation
    window (nats: how far its attention is from uniform over the n prompt tokens), clamped as `LayerEntropy`: the
    inverse of `seeds/001`'s rule, after the layers KVzip's top-k fills were mostly the low-entropy ones
    (`policies/entropy_focus.py` has the measurement). Ours, not a paper's."""

    min_layer_budget: float = 0.25
    max_layer_budget: float = 4.0
    policies: ClassVar[dict[str, str]] = {"layer": "entropy_focus", "head": "entropy_focus_per_head"}


@dataclass(frozen=True)
class Pyramid(_Part):
    """Budgets falling linearly from the bottom layer to the top one, top = mean / 20 (PyramidKV, Cai et al.
    2024, https://arxiv.org/abs/2406.02069)."""

    policies: ClassVar[dict[str, str]] = {"layer": "pyramidkv", "head": "pyramidkv_per_head"}


@dataclass(frozen=True)
class HeadTopK(_Part):
    """Each layer's head-slots shared among its KV heads by one top-k over their scores, every head first
    keeping 0.2 x budget (AdaKV, Feng et al. 2024, https://arxiv.org/abs/2407.11550)."""

    policies: ClassVar[dict[str, str]] = {"head": "adakv"}


@dataclass(frozen=True)
class CacheTopK(_Part):
    """One top-k over every (layer, KV head, token) score of the cache sets every budget (KVzip's allocation,
    Kim et al. 2025, https://arxiv.org/abs/2505.23416, section 3.3). Needs attention scores (not `KeyNorm`).
    `head_share` in [0, 1] (head granularity): budgets stay KVzip's, but a KV head fills its budget ranking a
    token by max(its own score, head_share x the layer's largest score for it); 0 is KVzip's head-wise ranking, 1
    ranks in every head of a layer by the largest score any of its heads gives. Ours, not a paper's."""

    head_share: float = 0.0
    policies: ClassVar[dict[str, str]] = {"head": "cache_topk", "layer": "cache_topk_layer"}


@dataclass(frozen=True)
class HeadEntropyTiers(_Part):
    """KV heads tiered by normalised attention entropy: high heads keep the most tokens, middle ones fewer in
    int8, low ones their top tokens only; `budget` is then a fraction of the cache's bytes (the entropy-adaptive
    KV compression article, `seeds/000`). `tier_by`: thresholds are "quantile"s of the heads' entropies or
    normalised "entropy" values, both in [0, 1]; `crop_history`: None, or keep only the sinks and the last
    `crop_history` prompt tokens."""

    tier_by: Literal["quantile", "entropy"] = "quantile"
    tier_thresholds: tuple[float, float] = (1 / 3, 2 / 3)
    crop_history: int | None = None
    policies: ClassVar[dict[str, str]] = {"head": "entropy_head"}


@dataclass(frozen=True)
class MatrixEntropyGroups(_Part):
    """Heads and layers grouped into budget tiers by the truncated matrix entropy of their `matrix_states`
    ("query" or "key"; top `matrix_rank` eigenvalues) (UNComp, Xiong et al. 2024, https://arxiv.org/abs/2410.03090,
    `seeds/002`); `head_groups` tiers per layer, `layer_groups` over the layers."""

    matrix_states: Literal["query", "key"] = "query"
    matrix_rank: int = 32
    head_groups: int = 2
    layer_groups: int = 2
    policies: ClassVar[dict[str, str]] = {"head": "matrix_entropy"}


@dataclass(frozen=True)
class Recency(_Part):
    """The sinks and the most recent tokens, the same budget in every layer, nothing scored (StreamingLLM,
    Xiao et al. 2023, https://arxiv.org/abs/2309.17453)."""

    policies: ClassVar[dict[str, str]] = {"layer": "streaming"}


@dataclass(frozen=True)
class KeepAll(_Part):
    """No compression: the full cache."""

    policies: ClassVar[dict[str, str]] = {"layer": "full"}


Allocator = Uniform | LayerEntropy | LayerFocus | Pyramid | HeadTopK | CacheTopK | HeadEntropyTiers | MatrixEntropyGroups | \
    Recency | KeepAll
ALLOCATOR_TYPES = (Uniform, LayerEntropy, LayerFocus, Pyramid, HeadTopK, CacheTopK, HeadEntropyTiers, MatrixEntropyGroups,
                   Recency, KeepAll)


# Every EntropyKVConfig field some part owns: a new composition sets them all afresh (`EntropyKVConfig.replace`).
PART_FIELDS = ("scorer", *dict.fromkeys(f.name for part in (*SCORER_TYPES.values(), *ALLOCATOR_TYPES)
                                        for f in dataclasses.fields(part)))


@dataclass(frozen=True)
class Composition:
    """A policy: `allocator` x `scorer` x `granularity`.

    scorer: None takes the policy's own (`Reconstruct()` for `CacheTopK`, `Window()` for the others); `Recency`
        and `KeepAll` rank nothing and refuse one. granularity: "layer" (one token set per layer) or "head" (one per
        KV head); None takes the allocator's first (`Allocator.policies`): "head" for `Uniform` and `CacheTopK`, "layer"
        for `LayerEntropy` and `Pyramid` (as their papers), the only one for the others.
    Raises ConfigError (a ValueError) for parts of the wrong kind and for compositions no policy implements.
    """

    allocator: Allocator
    scorer: Scorer | None = None
    granularity: Granularity | None = None

    def __post_init__(self) -> None:
        from .config import ConfigError

        if not isinstance(self.allocator, ALLOCATOR_TYPES):
            raise ConfigError(f"Composition.allocator={self.allocator!r} is invalid: expected one of "
                              f"{[c.__name__ + '()' for c in ALLOCATOR_TYPES]}")
        if self.scorer is not None and not isinstance(self.scorer, tuple(SCORER_TYPES.values())):
            raise ConfigError(f"Composition.scorer={self.scorer!r} is invalid: expected None or one of "
                              f"{[c.__name__ + '()' for c in SCORER_TYPES.values()]}")
        own = self.allocator.policies
        granularity = self.granularity or next(iter(own))
        if granularity not in own:
            raise ConfigError(f"Composition.granularity={self.granularity!r} is invalid for "
                              f"{type(self.allocator).__name__}: expected one of {sorted(own)}")
        object.__setattr__(self, "granularity", granularity)
        if self.scorer is not None and isinstance(self.allocator, (Recency, KeepAll)):
            raise ConfigError(f"Composition.scorer={self.scorer!r} is invalid with {type(self.allocator).__name__}, "
                              "which ranks no tokens: expected None")

    @property
    def policy(self) -> str:
        """The registered policy that implements it (`entropykv_fx.policies()`)."""
        return self.allocator.policies[self.granularity]

    def fields(self) -> dict[str, Any]:
        """The `EntropyKVConfig` fields it sets: policy, scorer (None: the policy's own) and its parts' parameters."""
        scorer = None if self.scorer is None else self.scorer.name
        return dict(policy=self.policy, scorer=scorer, **self.allocator.fields(),
                    **(self.scorer.fields() if self.scorer is not None else {}))

    def config(self, **fields: Any):
        """`EntropyKVConfig(policy=self, **fields)`: fields are the shared ones (budget, window, sink_tokens, ...)."""
        from .config import EntropyKVConfig

        return EntropyKVConfig(policy=self, **fields)

    @classmethod
    def of(cls, config) -> Composition:
        """The composition an `EntropyKVConfig` (or a policy name, with default parameters) runs."""
        from .config import EntropyKVConfig

        if isinstance(config, str):
            config = EntropyKVConfig(policy=config)
        allocator = next(a for a in ALLOCATOR_TYPES if config.policy in a.policies.values())
        granularity = next(g for g, p in allocator.policies.items() if p == config.policy)
        values = lambda part: {f.name: getattr(config, f.name) for f in dataclasses.fields(part)}  # noqa: E731
        scorer = None
        if allocator not in (Recency, KeepAll):
            kind = SCORER_TYPES[config.scorer]
            scorer = kind(**values(kind))
        return cls(allocator(**values(allocator)), scorer, granularity)

    @classmethod
    def named(cls, name: str) -> Composition:
        """The registered composition `name` (one of `entropykv_fx.policies()`), parameters at their defaults."""
        from .config import ConfigError
        from .policies import POLICIES

        if name not in POLICIES:
            raise ConfigError(f"Composition.named({name!r}): expected one of {sorted(POLICIES)}")
        return cls.of(name)
