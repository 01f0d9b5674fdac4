"""The base class of every exception entropykv_fx raises on purpose.

`except entropykv_fx.EntropyKVError` catches them all; each specific error also keeps the built-in type it had
(`ConfigError` is a `ValueError`, `UnsupportedModelError` a `TypeError`, ...), so existing handlers still work.
"""

from __future__ import annotations


class EntropyKVError(Exception):
    """Base class of entropykv_fx's own errors."""


class ExportError(EntropyKVError, ValueError):
    """An export that cannot be written or an export directory that cannot be loaded safely."""
