"""From what a user passes to token ids and protect masks: token-id lists, strings, and chat conversations.

A protect mask marks the prompt tokens that a budget policy never evicts and (with hidden-state pruning)
always carries into deeper layers. For a chat conversation it covers what an answer depends on most and a
recent-window score sees least: the template's special tokens, the system prompt (the template's own default
one included), the most recent part of the last user turn and the assistant header. For a plain prompt, the
caller may pass a mask; otherwise the policy protects the prompt's last `protect_tail` tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pyrajax import validate

ROLES = ("system", "user", "assistant")


def is_chat(prompt) -> bool:
    """A chat conversation: a non-empty list of {"role", "content"} dicts."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and len(prompt) > 0
            and all(isinstance(m, dict) for m in prompt))


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                              tokenize=True, return_dict=False))


def _find(seq: list[int], sub: list[int], start: int, stop: int) -> int | None:
    """First index i in [start, stop - len(sub)] with seq[i:i+len(sub)] == sub."""
    n = len(sub)
    for i in range(start, stop - n + 1):
        if seq[i:i + n] == sub:
            return i
    return None


def chat_prompt(tokenizer, messages, last_turn: int, index: int = 0) -> tuple[list[int], np.ndarray]:
    """Token ids of a conversation in the tokenizer's chat template, ready for the assistant's answer, and its
    protect mask: special tokens, system prompts, the template's preamble before the first non-system
    message, the last user turn's final `last_turn` tokens and the assistant header."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt {index} is a chat conversation but the tokenizer has no chat template; pass "
                         "token ids or a string, or use a checkpoint whose tokenizer has one")
    for j, m in enumerate(messages):
        if set(m) - {"role", "content"} or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt {index}, message {j}: {m!r} is not {{'role': one of {ROLES}, 'content': str}}")
    if messages[-1]["role"] != "user":
        raise ValueError(f"prompt {index}: a conversation must end with a user message (the model answers it)")
    ids = _render(tokenizer, messages, generation_prompt=True)
    protect = np.zeros(len(ids), bool)
    protect[np.isin(ids, list(tokenizer.all_special_ids))] = True
    # Span of message i: between the renderings of messages[:i] and messages[:i + 1]. Only when the template
    # renders prefixes stably (chat templates do); otherwise the special tokens and the tail are all we mark.
    ends = [len(_render(tokenizer, messages[:i], False)) for i in range(len(messages) + 1)]
    stable = all(ids[:e] == _render(tokenizer, messages[:i], False)[:e] for i, e in enumerate(ends))
    if not stable:
        protect[-last_turn:] = True
        return ids, protect
    for i, m in enumerate(messages):
        if m["role"] == "system":
            protect[ends[i]:ends[i + 1]] = True
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is not None:  # a template's own default system prompt sits before the first message's content
        content = tokenizer.encode(messages[first]["content"], add_special_tokens=False)
        at = _find(ids, content, ends[first], ends[first + 1]) if content else None
        if at is not None:
            protect[ends[first]:at] = True
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    protect[max(ends[last_user], ends[last_user + 1] - last_turn):ends[last_user + 1]] = True
    protect[ends[-1]:] = True  # the assistant header (the generation prompt)
    return ids, protect


def to_ids(prompt, tokenizer, vocab_size: int, index: int, name: str = "prompt", allow_empty: bool = False,
           kinds: str = "a list of token ids or a string") -> list[int]:
    """A token-id list or a string -> validated token ids. `name` and `index` name it in errors ("prompt 3"),
    `kinds` says what it may be."""
    label = f"{name} {index}"
    if isinstance(prompt, str) and not prompt and allow_empty:
        return []
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{label} is a string but no tokenizer is known; pass token ids, or "
                             "GenerationConfig(tokenizer=...), or load a checkpoint that has one")
        prompt = tokenizer.encode(prompt)
    return validate.token_ids(prompt, label, vocab_size, allow_empty=allow_empty, kinds=kinds)


def prepare(prompts, tokenizer, vocab_size: int, last_turn: int, protect=None):
    """Validated (token ids, protect mask or None) per prompt. `protect`: None, or one entry per prompt (a
    boolean sequence as long as the prompt's tokens, or None)."""
    validate.prompt_list(prompts)
    if is_chat(prompts):
        raise ValueError("prompts is one chat conversation; pass a list of conversations: [messages]")
    if protect is not None and not isinstance(protect, Sequence):
        raise ValueError(f"protect must be a list with one entry per prompt, got {validate.describe(protect)}")
    if protect is not None and len(protect) != len(prompts):
        raise ValueError(f"protect has {len(protect)} entries for {len(prompts)} prompts; give one per prompt "
                         "(None where the policy's default applies)")
    out = []
    for i, p in enumerate(prompts):
        if is_chat(p):
            ids, mask = chat_prompt(tokenizer, p, last_turn, i)
        else:
            ids, mask = to_ids(p, tokenizer, vocab_size, i, kinds=validate.PROMPT_KINDS), None
        if protect is not None and protect[i] is not None:
            try:
                given = np.asarray(protect[i])
            except ValueError:  # ragged nesting
                given = np.asarray(protect[i], dtype=object)
            if given.dtype != bool or given.shape != (len(ids),):
                raise ValueError(f"protect[{i}] must be a boolean mask of the prompt's {len(ids)} tokens, got "
                                 f"{given.dtype} of shape {given.shape}")
            mask = given if mask is None else mask | given
        out.append((ids, mask))
    return out
