"""Shared fixtures: the embedded SmolLM2 model (converted once per machine into the pyrajax cache) and its
HF transformers reference, loaded from the same GGUF."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")  # float32 references need true fp32 matmuls

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from checkpoints_convert.embedded import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="session")
def smol(smol_dir):
    """(params float32, config) of the embedded model."""
    import jax.numpy as jnp
    import pyrajax
    return pyrajax.load(smol_dir, dtype=jnp.float32)


@pytest.fixture(scope="session")
def smol_hf():
    """transformers' own float32 load of the same GGUF: the reference for logits and greedy output."""
    import torch
    from transformers import AutoModelForCausalLM
    from checkpoints_convert.embedded import default_gguf_path
    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def _mapped_regions() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. Each XLA CPU executable keeps memory mappings alive
    (measured: ~120 new mappings a second while a module compiles); one pytest process holding them all passed
    Linux's default limit of 65530 and a later compile aborted the process (seen only in the full suite)."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _free_compiled_programs_when_many():
    """The same inside a long module, once the mappings reach half the default limit."""
    yield
    if _mapped_regions() > 32000:
        jax.clear_caches()
