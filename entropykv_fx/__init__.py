"""entropykv_fx: entropy-guided KV-cache compression for Hugging Face causal LMs.

    model = entropykv_fx.optimize(model, budget=0.25)   # policy="cache_topk", scorer="reconstruct" (the defaults)
    out = model.generate(**inputs, max_new_tokens=64)
    print(entropykv_fx.report(model))

Names are imported on first use, so `entropykv_fx.ops` and `entropykv_fx.exported` (running exported programs)
load without transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EntropyKVCache": "cache", "CompressionReport": "compress", "LayerReport": "compress",
    "ConfigError": "config", "EntropyKVConfig": "config", "SUPPORTED_MODELS": "hf", "UnsupportedModelError": "hf",
    "optimize": "hf", "report": "hf", "restore": "hf", "compressing": "hf", "optimized": "hf", "Optimized": "hf",
    "UnsupportedCallError": "hf", "NotOptimizedError": "hf", "explain": "passes", "export": "aot",
    "ExportError": "errors", "ExportedGenerator": "exported", "StaticCacheModel": "static", "StaticDecoder": "decode",
    "EntropyKVError": "errors", "InputError": "errors", "ArgumentTypeError": "errors", "Calibration": "config",
    "ExportLayout": "exported", "BudgetFloorWarning": "errors", "TransformersVersionError": "compat", "UntestedTransformersWarning": "compat",
    "RankDivergenceError": "parallel", "PositionRangeWarning": "errors",
    **dict.fromkeys(("Composition", "Window", "LastQuery", "KeyNorm", "Reconstruct", "Uniform", "LayerEntropy", "LayerFocus",
                     "Pyramid", "HeadTopK", "CacheTopK", "HeadEntropyTiers", "MatrixEntropyGroups", "Recency",
                     "KeepAll"), "composition"),
}
_SUBMODULES = ("policies", "reuse", "calibrate", "exporters", "scorers", "parallel", "composition")
__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `policies` is callable too: entropykv_fx.policies() lists the policies
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'entropykv_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
