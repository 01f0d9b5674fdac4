"""Fused projections: each decoder layer's q/k/v weights, and its gate/up weights, back to back in one tensor.

Why: a decode step of one token per row reads every weight once, and a small matrix reads slowly: on the H200 a
batch-1 `F.linear` over k_proj (1024 x 4096) reaches 21% of the copy bandwidth, q/k/v fused (6144 x 4096) 76%
(`benchmarks/results/profile_step_h200.md`). `FusedProjections.fuse(model)` moves each group's weights (and biases)
into one tensor and makes every `nn.Linear`'s parameter a view of its rows: the model's own code and memory are
unchanged. The graph pass `passes.fuse_projections` then computes each group with one matmul over the whole
tensor; `unfuse()` gives every Linear a tensor of its own again (what saving a checkpoint expects).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# (submodule of a decoder layer, its Linear layers that read the same input)
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


@dataclass
class FusedGroup:
    """Linears whose weights are consecutive rows of `weight` [sum of out_features, in_features] (biases of `bias`)."""

    linears: tuple[nn.Linear, ...]
    weight: Tensor
    bias: Tensor | None

    def __post_init__(self) -> None:
        self.addresses = self._addresses()

    def _addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for m in self.linears for t in (m.weight, m.bias) if t is not None)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(linear.out_features for linear in self.linears)

    def intact(self) -> bool:
        """Whether every Linear still holds its view of `weight` (and `bias`): nobody replaced a parameter."""
        return self._addresses() == self.addresses


def _fusable(linears: list[nn.Module]) -> bool:
    if len(linears) < 2 or not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0].weight
    same = all(type(m.weight) in (Tensor, nn.Parameter) and m.weight.dtype == first.dtype and
               m.weight.device == first.device and m.in_features == linears[0].in_features for m in linears)
    same = same and first.device.type != "meta"  # offloaded weights (accelerate) are loaded per forward: left alone
    with_bias = {m.bias is not None for m in linears}
    return same and len(with_bias) == 1


@dataclass
class FusedProjections:
    """The fused groups of one model (see the module docstring)."""

    groups: list[FusedGroup]

    @classmethod
    @torch.no_grad()
    def fuse(cls, model: nn.Module) -> FusedProjections:
        """Fuse every group of plain `nn.Linear`s of the same input size, dtype and device, in place."""
        groups = []
        for layer in model.model.layers:
            for owner_name, names in GROUPS:
                owner = getattr(layer, owner_name, None)
                linears = [getattr(owner, name, None) for name in names]
                if owner is None or not _fusable(linears):
                    continue
                weight = torch.cat([m.weight for m in linears])
                bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
                start = 0
                for m in linears:
                    rows = slice(start, start + m.out_features)
                    m.weight = nn.Parameter(weight[rows], requires_grad=m.weight.requires_grad)
                    if bias is not None:
                        m.bias = nn.Parameter(bias[rows], requires_grad=m.bias.requires_grad)
                    start += m.out_features
                groups.append(FusedGroup(tuple(linears), weight, bias))
        return cls(groups)

    def intact(self) -> bool:
        return all(group.intact() for group in self.groups)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Every Linear gets its own weight (and bias) again, with the same values."""
        for group in self.groups:
            for m in group.linears:
                m.weight = nn.Parameter(m.weight.clone(), requires_grad=m.weight.requires_grad)
                if m.bias is not None:
                    m.bias = nn.Parameter(m.bias.clone(), requires_grad=m.bias.requires_grad)
        self.groups = []

    def members(self) -> dict[tuple[int, tuple[int, ...]], tuple[FusedGroup, int]]:
        """(address, shape) of each fused weight -> (its group, the index of its Linear in the group)."""
        return {(m.weight.data_ptr(), tuple(m.weight.shape)): (group, i)
                for group in self.groups for i, m in enumerate(group.linears)}
