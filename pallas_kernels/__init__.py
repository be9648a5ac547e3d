"""Pallas (Triton) kernels of pyrajax, each with a jnp reference and `impl="auto" | "pallas" | "xla"`.

- score_reduction: PyramidInfer window-attention scores per context token, flash style (no [B, H, W, n] in memory);
  `window_rows` is its rows mode: the head-averaged window rows [B, W, n] that prefill uses (they also seed the
  generation-phase buffer).
- pivotal_gather: the kept tokens' hidden / pos (and K/V) rows, in one pass.
- decode_attention: one-token attention over a per-layer cache, skipping slots >= length, plus the
  head-averaged probability row the generation-phase eviction needs.
"""
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference, decode_block_sizes
from pallas_kernels.gather import gather_block_sizes, pivotal_gather, pivotal_gather_reference
from pallas_kernels.score_reduction import (score_reduction, score_reduction_block_sizes, score_reduction_reference,
                                            window_rows, window_rows_block_sizes, window_rows_reference)

__all__ = [
    "decode_attention", "decode_attention_reference", "decode_block_sizes",
    "pivotal_gather", "pivotal_gather_reference", "gather_block_sizes",
    "score_reduction", "score_reduction_reference", "score_reduction_block_sizes",
    "window_rows", "window_rows_reference", "window_rows_block_sizes",
]
