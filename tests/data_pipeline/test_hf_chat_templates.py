"""An imported model's own chat template, rendered by us, against transformers' apply_chat_template
on tokenizer files transformers wrote: the same ids, and the same assistant masks (from the
template's generation blocks, and by comparing renders when a template has none)."""
import pytest

from data_pipeline.tokenizer.chat_template import chat_stop_ids, generation_prompt_ids, render_chat
from data_pipeline.tokenizer.hf_tokenizer import HFTokenizer
from data_pipeline.tokenizer.tokenizer import load_tokenizer
from tests.data_pipeline.hf_style import CONVERSATIONS, STYLES, save_hf_tokenizer, untagged
from utils.errors import UserError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=sorted(STYLES))
def style(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = save_hf_tokenizer(root / "tagged", request.param)
    save_hf_tokenizer(root / "untagged", request.param, untagged(STYLES[request.param]["template"]))
    return request.param, hf, load_tokenizer(root / "tagged"), load_tokenizer(root / "untagged")


def conversations(style_name):
    # Mistral-style templates know only user and assistant turns.
    return [c for c in CONVERSATIONS if style_name != "mistral" or all(m["role"] != "system" for m in c)]


def test_ids_equal_apply_chat_template(style):
    name, hf, ours, _ = style
    assert isinstance(ours, HFTokenizer)
    for conv in conversations(name):
        for prompt in (conv[:-1], conv):
            for gen in (True, False):
                if name == "mistral" and gen:
                    continue  # the style has no generation prompt
                want = hf.apply_chat_template(prompt, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
                assert render_chat(ours, prompt, add_generation_prompt=gen)[0] == want, (name, prompt, gen)


def test_assistant_masks_equal_transformers_with_and_without_generation_blocks(style):
    name, hf, tagged, plain = style
    for conv in conversations(name):
        out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        want = out["assistant_masks"]
        assert sum(want) > 0
        assert render_chat(tagged, conv)[1] == want, (name, "generation blocks", conv)
        ids, mask = render_chat(plain, conv)
        assert ids == out["input_ids"] and mask == want, (name, "render comparison", conv)


def test_generation_prompt_ids_are_what_add_generation_prompt_appends(style):
    """The assistant header a raw /v1/completions prompt may end with (then it stops at end-of-turn)."""
    name, hf, ours, _ = style
    conv = [{"role": "user", "content": "Hello there"}]
    opened = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    closed = hf.apply_chat_template(conv, add_generation_prompt=False, tokenize=True, return_dict=True)["input_ids"]
    assert generation_prompt_ids(ours) == opened[len(closed):]
    assert (generation_prompt_ids(ours) == []) == (name == "mistral")  # the style has no generation prompt


def test_masked_tokens_decode_to_the_assistant_turns(style):
    """Independent of transformers: the masked tokens spell the assistant replies and their end token."""
    name, _, _, plain = style
    conv = CONVERSATIONS[1] if name != "mistral" else CONVERSATIONS[0]
    ids, mask = render_chat(plain, conv)
    text = plain.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    for m in conv:
        if m["role"] == "assistant":
            assert m["content"].strip() in text
        else:
            assert m["content"] not in text
    assert text.count(STYLES[name]["end"]) == sum(m["role"] == "assistant" for m in conv)  # the end token is learned


def test_stop_ids_special_tokens_and_template_errors(style, tmp_path):
    name, hf, ours, _ = style
    assert hf.convert_tokens_to_ids(STYLES[name]["eos"]) in chat_stop_ids(ours)
    assert ours.eos_id == hf.eos_token_id and ours.bos_id == hf.bos_token_id
    if name == "mistral":
        with pytest.raises(UserError, match="roles must be user and assistant"):
            render_chat(ours, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    save_hf_tokenizer(tmp_path / "broken", name, "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(UserError, match="does not parse"):
        render_chat(load_tokenizer(tmp_path / "broken"), CONVERSATIONS[0])


def test_a_template_cannot_escape_the_sandbox(tmp_path):
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    save_hf_tokenizer(tmp_path / "evil", "chatml", evil)
    with pytest.raises(UserError):
        render_chat(load_tokenizer(tmp_path / "evil"), CONVERSATIONS[0])
