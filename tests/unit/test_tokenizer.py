from transformers import AutoTokenizer

from models.loading import DEFAULT_CHECKPOINT
from models.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode_prompt


def test_committed_tokenizer_loads_with_autotokenizer():
    tok = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    text = '{"name":"Alice Smith","age":34,"active":true}'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_ends_where_the_answer_starts():
    tok = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    ids = encode_prompt(tok, "Describe Paris in a few words.")
    assert ids[0] == BOS_ID
    assert tok.decode(ids).endswith("<start_of_turn>model\n")
    assert "<start_of_turn>user\nDescribe Paris in a few words.<end_of_turn>" in tok.decode(ids)
