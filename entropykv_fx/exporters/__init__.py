"""Exporters of the rewritten prefill/decode programs (`entropykv_fx.aot`) to other runtimes."""
