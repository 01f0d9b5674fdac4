"""The base class of every exception entropykv_fx raises on purpose.

`except entropykv_fx.EntropyKVError` catches them all; each specific error also keeps the built-in type it had
(`ConfigError` is a `ValueError`, `UnsupportedModelError` a `TypeError`, ...), so existing handlers still work.
"""

from __future__ import annotations


class EntropyKVError(Exception):
    """Base class of entropykv_fx's own errors."""


class ExportError(EntropyKVError, ValueError):
    """An export that cannot be written or an export directory that cannot be loaded safely."""


class BudgetFloorWarning(UserWarning):
    """A requested or calibrated budget below the always-kept sink_tokens + window tokens was raised to them."""


class PositionRangeWarning(UserWarning):
    """A reconstruction prefill (scorer 'reconstruct') runs past the model's `max_position_embeddings`: the
    repeated prompt attends at distances the model was not trained on, so its scores (and the kept tokens) degrade."""


class InputError(EntropyKVError, ValueError):
    """A bad argument value of a public function or CLI option: names the argument, the value, what is accepted."""


class ArgumentTypeError(EntropyKVError, TypeError):
    """An argument of the wrong type (e.g. a policy name where a config object belongs)."""


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters for an error message; a string (often a path the caller must find
    in the message) up to 300."""
    text = repr(value)
    limit = max(limit, 300) if isinstance(value, str) else limit
    return text if len(text) <= limit else text[:limit - 3] + "..."
