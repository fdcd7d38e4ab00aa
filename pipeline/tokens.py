"""Jobs to token ids and back: the prompt a backend encodes, the text its result carries."""

from __future__ import annotations

from typing import Callable, Sequence

from .interfaces import Job


def encode_job(tokenizer, job: Job) -> list[int]:
    """Prompt token ids: the chat template for ``messages``, ``<bos>`` + text for ``prompt``."""
    if job.messages is not None:
        from models.tokenizer import encode_messages

        return encode_messages(tokenizer, [{"role": r, "content": c} for r, c in job.messages])
    ids = tokenizer(job.prompt or "", add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + list(ids)


def detokenizer(tokenizer) -> Callable[[Sequence[int]], str]:
    """Token ids -> text, special tokens dropped (what the engines' results carry)."""
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
