"""Everything that differs between the transformers releases entropykv_fx supports, in one place.

Supported and tested: transformers `OLDEST_TESTED` to `NEWEST_TESTED` (the fast test suite runs on both ends;
`scripts/test_transformers.sh VERSION` runs it on any other release). Differences handled here:

- 5.24 renamed the model forward's cache argument and the outputs' cache field from `past_key_values` to
  `cache` (the old name still works there, with a deprecation warning, until 5.40). `generate()` passes the
  new name. `cache_in_call` reads whichever a call used, `cache_of` reads it from an output, `with_cache`
  builds the keyword for the installed release.
- transformers' GGUF loader draws a tqdm bar that its progress-bar switch does not govern
  (`gguf_progress_bar_off`).
- 5.24 passes `kwargs=` to `Cache.update` (our caches accept and ignore extra arguments) and dropped
  `DynamicLayer.dtype` (our layers read dtypes from their tensors).

Nothing else in the library compares transformers versions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import transformers
from packaging.version import Version
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .errors import EntropyKVError

OLDEST_TESTED = Version("5.17.0")
NEWEST_TESTED = Version("5.24.0")
# Releases known to break entropykv_fx, with the reason: optimize() refuses them.
KNOWN_BROKEN: dict[str, str] = {}

INSTALLED = Version(transformers.__version__)
# The model forward's cache argument in the installed release (the same for every supported architecture).
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")


class TransformersVersionError(EntropyKVError, RuntimeError):
    """The installed transformers is a release known to break entropykv_fx."""


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside the tested range."""


def check_transformers_version() -> None:
    """Warn for a release outside the tested range; raise `TransformersVersionError` for a known-broken one."""
    tested = f"tested range {OLDEST_TESTED}..{NEWEST_TESTED}"
    reason = KNOWN_BROKEN.get(str(INSTALLED))
    if reason is not None:
        raise TransformersVersionError(f"entropykv_fx: transformers {INSTALLED} is known to be broken ({reason}); "
                                       f"install a release in the {tested}")
    if not OLDEST_TESTED <= INSTALLED <= NEWEST_TESTED:
        warnings.warn(f"entropykv_fx: transformers {INSTALLED} is outside the {tested}; if something fails, "
                      f"`pip install 'transformers=={NEWEST_TESTED}'`", UntestedTransformersWarning, stacklevel=3)


def cache_in_call(kwargs: dict[str, Any]) -> tuple[str, Any]:
    """(the keyword the call passed its cache under, the cache); `CACHE_ARG` and None when it passed none."""
    given = [name for name in _CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("entropykv: pass the cache once, as `cache` or as `past_key_values`, not both")
    name = given[0] if given else next((n for n in _CACHE_NAMES if n in kwargs), CACHE_ARG)
    return name, kwargs.get(name)


def with_cache(cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to a model forward of the installed release."""
    return {CACHE_ARG: cache}


def cache_of(output: Any) -> Any:
    """The cache a model forward returned (`output.cache` from 5.24 on, `output.past_key_values` before)."""
    return output[CACHE_ARG] if CACHE_ARG in output else None


@contextlib.contextmanager
def gguf_progress_bar_off() -> Iterator[None]:
    """Silence the GGUF loader's own tqdm bar for the block (e.g. when stderr is a log file)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading

    bar = gguf_loading.tqdm
    gguf_loading.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_loading.tqdm = bar
