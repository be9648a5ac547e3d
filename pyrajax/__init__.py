"""pyrajax: a JAX LLaMA inference engine with PyramidInfer layer-wise KV-cache compression."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from pyrajax import validate
from pyrajax.cache import PyramidConfig, cache_preset
from pyrajax.config import ModelConfig, preset
from pyrajax.generate import GenerationConfig, GenerationResult, extend, generate, get_tokenizer, logits
from pyrajax.params import Params, random_params
from pyrajax.sharding import make_mesh, shard


def load(path, dtype=jnp.bfloat16, mesh=None) -> tuple[Params, ModelConfig]:
    """Load a checkpoint written by `pyrajax-convert`: (params, config). The config remembers the checkpoint's
    tokenizer, so `generate` can take strings and return texts. dtype: "bfloat16", "float16" or "float32" (a
    name or a jax/numpy dtype). mesh: a `make_mesh(tp=N)` mesh to restore the weights straight into their
    tensor-parallel shards (each device reads only its own; no full host copy)."""
    from pyrajax.params import load_checkpoint
    params, config = load_checkpoint(path, validate.dtype(dtype), mesh)
    tok = Path(path).absolute() / "tokenizer"
    if tok.is_dir():
        config = dataclasses.replace(config, tokenizer_dir=str(tok))
    return params, config


__all__ = ["GenerationConfig", "GenerationResult", "ModelConfig", "Params", "PyramidConfig", "cache_preset",
           "extend", "generate", "get_tokenizer", "load", "logits", "make_mesh", "preset", "random_params", "shard"]
