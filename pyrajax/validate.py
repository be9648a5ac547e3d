"""Checks of what a user hands in: token ids, prompts, stop ids, seeds, sampling settings and dtype names.

One module for the Python API, the command lines and the HTTP server, so that all of them refuse the same inputs
with the same words. Every refusal is a ValueError whose message names the argument, shows what was given and
says what to pass instead. Nothing is coerced silently: a float is never rounded to a token id, a bool is never
taken for an int, a nested list is never flattened. Numpy integers count as ints (and come back as Python ints).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

import ml_dtypes
import numpy as np

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
          "float32": np.dtype(np.float32)}
IMPLS = ("auto", "pallas", "xla")  # kernel implementations (auto: Pallas on GPU)
SEED_LIMIT = 2**32  # seeds key a Threefry-2x32 counter: one uint32
PROMPT_KINDS = "a list of token ids, a string or a chat conversation (a list of {'role', 'content'} dicts)"


def describe(value) -> str:
    """`value` for an error message: its repr (shortened) and its type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def is_int(value) -> bool:
    """A Python or numpy integer; bools are not."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A finite int or float; bools are not."""
    try:
        return (is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def integer(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as a Python int in [low, high) (either bound may be None)."""
    span = ("" if low is None and high is None else f" >= {low}" if high is None
            else f" < {high}" if low is None else f" in [{low}, {high})")
    if not is_int(value) or (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name} must be an int{span}, got {describe(value)}")
    return int(value)


def real(value, name: str) -> float:
    """`value` as a finite Python float: an int or a float, never a bool, a string or NaN/Inf."""
    if not is_real(value):
        raise ValueError(f"{name} must be a finite number, got {describe(value)}")
    return float(value)


def token_ids(value, name: str, vocab_size: int, *, allow_empty: bool = False, kinds: str = "a list of token ids"
              ) -> list[int]:
    """A flat list of ints in [0, vocab_size): a list, tuple or 1-D integer numpy array. `kinds` says in the
    message what `value` may be."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not (value.size == 0 or np.issubdtype(value.dtype, np.integer)):
            raise ValueError(f"{name} must be {kinds}; got a numpy array of {value.dtype} with shape {value.shape} "
                             "(token ids are a 1-D integer array)")
        ids = value.tolist()
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        ids = list(value)
        for j, t in enumerate(ids):
            if not is_int(t):
                hint = ("; pass one flat list per prompt" if isinstance(t, (list, tuple, np.ndarray)) else
                        "; token ids are ints, never rounded" if isinstance(t, (float, np.floating)) else "")
                raise ValueError(f"{name} must hold integer token ids, but item {j} is {describe(t)}{hint}")
        ids = [int(t) for t in ids]
    else:
        raise ValueError(f"{name} must be {kinds}, got {describe(value)}")
    if not ids and not allow_empty:
        raise ValueError(f"{name} is empty; it needs at least one token id")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return ids


def token_batch(value, name: str, vocab_size: int) -> np.ndarray:
    """[batch, length] int32 token ids from one flat list or equal-length lists (or a 1-D / 2-D integer array)."""
    if not isinstance(value, (Sequence, np.ndarray)) and hasattr(value, "__array__"):
        value = np.asarray(value)  # a jax array
    nested = (value.ndim == 2 if isinstance(value, np.ndarray) else
              isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))
              and any(isinstance(row, (list, tuple, np.ndarray)) for row in value))
    rows = ([token_ids(row, f"{name}[{i}]", vocab_size) for i, row in enumerate(value)] if nested
            else [token_ids(value, name, vocab_size, kinds="a list of token ids or a list of equal-length lists")])
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ValueError(f"{name} must be equal-length token lists (a [batch, length] batch), got lengths "
                         f"{lengths[:5]}; call once per length")
    return np.array(rows, np.int32)


def token_array(value, name: str, batch: int, length: int | None = None) -> None:
    """An integer array [batch, length] (length None: any), checked by dtype and shape only, so that it works on
    traced arrays inside jit (the values are not known there)."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if (shape is None or len(shape) != 2 or shape[0] != batch or (length is not None and shape[1] != length)
            or not np.issubdtype(dtype, np.integer)):
        want = f"[{batch}, {'n' if length is None else length}]"
        got = f"{dtype} of shape {tuple(shape)}" if shape is not None else describe(value)
        raise ValueError(f"{name} must be an integer array {want} (one row per cached sequence), got {got}")


def prompt_list(prompts) -> None:
    """`prompts` is a non-empty list of prompts (each checked on its own later)."""
    if isinstance(prompts, str):
        raise ValueError("prompts is one string; pass a list of prompts: [text]")
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1 and prompts.size:
        raise ValueError("prompts is one token-id array; pass a list of prompts: [ids]")
    if not isinstance(prompts, (Sequence, np.ndarray)) or isinstance(prompts, (bytes, bytearray)) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of prompts ({PROMPT_KINDS} each), got {describe(prompts)}")
    if all(is_int(p) for p in prompts):
        raise ValueError("prompts is one list of token ids; pass a list of prompts: [ids]")


def stop_ids(value, vocab_size: int) -> tuple[int, ...] | None:
    """None (the model's EOS ids), or token ids in the vocabulary as a tuple; () never stops."""
    if value is None:
        return None
    if is_int(value):
        raise ValueError(f"stop_ids must be a list of token ids, got the single id {describe(value)}; pass "
                         f"({value},), or None for the model's EOS ids, or () to never stop")
    return tuple(token_ids(value, "stop_ids", vocab_size, allow_empty=True,
                           kinds="a list of token ids (None: the model's EOS ids; (): never stop)"))


def seed(value) -> int:
    if not is_int(value) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**32), got {describe(value)}")
    return int(value)


def sampling(temperature, top_k, top_p, vocab_size: int) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) checked and normalised to (float, int, float)."""
    temperature = real(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    top_k = integer(top_k, "top_k", 0)
    if top_k > vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary ({vocab_size} tokens); use top_k <= {vocab_size}, "
                         "or 0 for no top-k filter")
    top_p = real(top_p, "top_p")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p}")
    return temperature, top_k, top_p


def dtype(value, name: str = "dtype") -> np.dtype:
    """A floating-point weight dtype, by name ("bfloat16", "float16", "float32") or as a numpy/jax dtype."""
    if isinstance(value, str):
        found = DTYPES.get(value)
    else:
        try:
            found = np.dtype(value)
        except (TypeError, ValueError):
            found = None
        found = found if found in DTYPES.values() else None
    if found is None:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(DTYPES)}")
    return found


def tokenizer(value) -> None:
    """None, a tokenizer directory, or a tokenizer object (anything with encode and decode)."""
    if isinstance(value, (str, os.PathLike)):
        if not Path(value).is_dir():
            raise ValueError(f"tokenizer {str(value)!r} is not a directory; pass a tokenizer directory (such as a "
                             "checkpoint's tokenizer/) or a transformers tokenizer")
    elif value is not None and not (callable(getattr(value, "encode", None)) and callable(getattr(value, "decode", None))):
        raise ValueError(f"tokenizer must be a transformers tokenizer or a tokenizer directory, got {describe(value)}")


# ---------------------------------------------------------------------------------------------------------
# Command-line argument types (argparse `type=`): a bad value gets argparse's usage line and this message.

def cli_int(low: int):
    """An argparse type: an int >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; it must be >= {low}")
        return value
    return parse


def _cli_type(check):
    """An argparse type from a check that raises ValueError: the text itself, or argparse's error with the
    check's message."""
    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return parse


def _check_cache(text: str) -> None:
    from pyrajax.cache import cache_preset  # cache imports this module
    cache_preset(text)


# argparse types: a cache policy name that `cache_preset` accepts (checked before any model loads), and a
# weight dtype name.
cli_cache = _cli_type(_check_cache)
cli_dtype = _cli_type(dtype)
