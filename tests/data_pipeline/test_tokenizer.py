"""The Tokenizer wrapper and THE chat template (checked against transformers' apply_chat_template)."""
from __future__ import annotations

import pytest

from data_pipeline.tokenizer.chat_template import chat_stop_ids, generation_prompt_ids, render_chat
from data_pipeline.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer, file_hash
from utils.errors import UserError

CHAT = [{"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "#### 8"}]


def test_special_ids_and_attributes(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.im_start_id, tokenizer.im_end_id) == (0, 1, 2, 3)
    assert tokenizer.pad_id == tokenizer.eos_id
    assert tokenizer.vocab_size == 600
    assert tokenizer.hash == file_hash(tokenizer.path) and len(tokenizer.hash) == 16


def test_encode_adds_nothing_and_ignores_special_text(tokenizer):
    ids = tokenizer.encode("Hello <|im_end|> there")
    assert not set(ids) & {0, 1, 2, 3, 4}
    assert tokenizer.decode(ids) == "Hello <|im_end|> there"
    assert tokenizer.encode_batch(["a b", "c"]) == [tokenizer.encode("a b"), tokenizer.encode("c")]
    assert tokenizer.decode([1, *tokenizer.encode("hi"), 3]) == "hi"
    assert tokenizer.decode([1, 3], skip_special_tokens=False) == "<|bos|><|im_end|>"
    with pytest.raises(UserError, match="surrogate"):
        tokenizer.encode("bad \udcff")


def test_missing_or_broken_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="train_tokenizer"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_render_chat_exact_format_and_mask(tokenizer):
    ids, mask = render_chat(tokenizer, CHAT)
    assert len(ids) == len(mask)
    expected = ("<|bos|><|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?"
                "<|im_end|>\n<|im_start|>assistant\n2 + 3 = <<2+3=5>>5\n#### 5<|im_end|>\n<|im_start|>user\n"
                "And 4 + 4?<|im_end|>\n<|im_start|>assistant\n#### 8<|im_end|>\n")
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected
    # The mask covers exactly each assistant content and its closing <|im_end|>.
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    assert [tokenizer.decode(s, skip_special_tokens=False) for s in spans] == [
        "2 + 3 = <<2+3=5>>5\n#### 5<|im_end|>", "#### 8<|im_end|>"]
    assert ids[0] == tokenizer.bos_id and mask[0] == 0


def test_generation_prompt_extends_the_prompt(tokenizer):
    prompt, pmask = render_chat(tokenizer, CHAT[:2], add_generation_prompt=True)
    full, _ = render_chat(tokenizer, CHAT[:3])
    assert full[:len(prompt)] == prompt and not any(pmask)
    assert tokenizer.decode(prompt, skip_special_tokens=False).endswith("?<|im_end|>\n<|im_start|>assistant\n")
    assert chat_stop_ids(tokenizer) == [tokenizer.im_end_id, tokenizer.eos_id]
    header = generation_prompt_ids(tokenizer)
    assert prompt[-len(header):] == header and tokenizer.decode(header, skip_special_tokens=False) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"), ("hello", "list"), ([{"role": "bot", "content": "x"}], "role"),
    ([{"role": "user", "content": 3}], "string"), (["hi"], "dict")])
def test_render_chat_validates(tokenizer, bad, match):
    with pytest.raises(UserError, match=match):
        render_chat(tokenizer, bad)


def test_same_ids_as_transformers_chat_template(tokenizer):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tokenizer.path.parent))
    for msgs, gen in ((CHAT, False), (CHAT[:2], True)):
        out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        out = out["input_ids"] if hasattr(out, "keys") else out
        assert list(out) == render_chat(tokenizer, msgs, add_generation_prompt=gen)[0]
