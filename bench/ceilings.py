"""The device's ceilings, measured where a benchmark starts (a few seconds), so that rooflines never rest on
another machine's constants:

* copy bandwidth: a jitted elementwise pass over a large buffer reads and writes every byte once, so it moves
  2 x bytes (read + write), the way decode moves weights and KV;
* matmul rate: a chain of square matmuls in the benchmark's dtype inside one program (no dispatch between them).

Each is the best of a few timed repeats after a warm-up (the best is the ceiling; noise only slows a run).

    python -m bench.ceilings          # prints the JSON
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp


def _best_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(nbytes: int) -> float:
    """Bytes per second read + written by an elementwise pass over `nbytes` of float32."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    step = jax.jit(lambda a: a * 1.5)
    return 2 * x.nbytes / _best_seconds(step, x)


def matmul_rate(size: int, dtype, chain: int = 8) -> float:
    """FLOP/s of `chain` [size, size] @ [size, size] matmuls in `dtype`, back to back in one program."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = (jax.random.normal(jax.random.key(1), (size, size), jnp.float32) / size ** 0.5).astype(dtype)
    run = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda _, c: c @ b, a))
    return chain * 2 * size ** 3 / _best_seconds(run, a, b)


def measure(dtype=jnp.bfloat16) -> dict:
    """Ceilings of the default device: sizes large enough to saturate an accelerator, small on a CPU."""
    dev = jax.devices()[0]
    accelerator = dev.platform != "cpu"
    nbytes = 2 << 30 if accelerator else 1 << 25
    size = 8192 if accelerator else 512
    dtype = dtype if accelerator else jnp.float32  # CPUs have no fast bf16 matmul: time what they run
    t0 = time.perf_counter()
    out = dict(device=getattr(dev, "device_kind", str(dev)), copy_bytes_per_second=copy_bandwidth(nbytes),
               copy_buffer_bytes=nbytes, matmul_flops_per_second=matmul_rate(size, dtype),
               matmul_size=size, matmul_dtype=jnp.dtype(dtype).name)
    out["seconds"] = time.perf_counter() - t0
    return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
