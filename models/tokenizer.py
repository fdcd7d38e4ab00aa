"""Byte-level BPE tokenizer trained on the task corpus, saved as a ``PreTrainedTokenizerFast``.

Special tokens keep Gemma's ids for pad/eos/bos so the DiffusionGemma config defaults hold:
``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, then ``<start_of_turn>`` and ``<end_of_turn>``.
The chat template is Gemma's turn format; the model answers after ``<start_of_turn>model\\n`` and
ends its answer with ``<eos>``.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def train_tokenizer(lines: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``lines`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        if tok.token_to_id(token) != expected:
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {expected}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_prompt(tokenizer, user_message: str) -> list[int]:
    """Token ids of a one-turn chat prompt, ending where the model's answer begins."""
    return encode_messages(tokenizer, [{"role": "user", "content": user_message}])


def encode_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
