"""entropykv_fx: entropy-guided KV-cache compression for Hugging Face causal LMs.

    model = entropykv_fx.optimize(model, policy="entropy", budget=0.25)
    out = model.generate(**inputs, max_new_tokens=64)
    print(entropykv_fx.report(model))
"""

from .cache import EntropyKVCache
from .compress import CompressionReport, LayerReport
from .config import ConfigError, EntropyKVConfig
from .hf import SUPPORTED_MODELS, UnsupportedModelError, optimize, report
from .passes import explain
from .policies import policies

__version__ = "0.1.0"

__all__ = [
    "CompressionReport", "ConfigError", "EntropyKVCache", "EntropyKVConfig", "LayerReport", "SUPPORTED_MODELS",
    "UnsupportedModelError", "explain", "optimize", "policies", "report",
]
