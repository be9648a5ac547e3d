"""Offline task generators for the cache-policy evaluation: a RULER subset (`ruler`) and a short chat regression
set (`chat`). Nothing here imports JAX; everything needs only a Hugging Face tokenizer with a chat template."""
from __future__ import annotations

from pyrajax.tasks.chat import CHAT_SYSTEM, chat_prompt_ids, chat_prompts
from pyrajax.tasks.ruler import DATA, RULER_TASKS, ruler_samples, score

__all__ = ["CHAT_SYSTEM", "DATA", "RULER_TASKS", "chat_prompt_ids", "chat_prompts", "ruler_samples", "score"]
