"""Tokenizers and chat templates in the styles of published model families, written for the tests
(no hub access): each is saved with ``transformers`` as a model directory's tokenizer files, so
tests compare our rendering with ``apply_chat_template`` on files another tool wrote.

``end`` is the text that closes an assistant turn. Every template marks the assistant's text (and the end-of-turn token after it) with
``{% generation %}`` blocks; ``untagged(template)`` is the same template without them, for the
masks computed by comparing renders.
"""
from __future__ import annotations

import re
from pathlib import Path

CORPUS = [
    "Once upon a time there was a little robot who loved to count numbers.",
    "What is 12 plus 30? The answer is 42. Think step by step, then answer.",
    "The cat sat on the mat. She said: hello there, how are you today?",
    "Café crème, naïve façade, 中文字符 and emoji 🙂 make the bytes interesting.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
] * 30

# Qwen2's pre-tokenizer: digits one by one, letters with one leading non-letter, newline runs apart.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

STYLES: dict[str, dict] = {
    "llama3": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "end": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "template": (
            "{{ bos_token }}{% for m in messages %}"
            "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
            "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    },
    "chatml": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None, "eos": "<|im_end|>", "end": "<|im_end|>",
        "tokenizer_class": "Qwen2Tokenizer", "split": QWEN2_SPLIT,
        "template": (
            "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
            "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    },
    "mistral": {
        "specials": ["<s>", "</s>", "[INST]", "[/INST]"],
        "bos": "<s>", "eos": "</s>", "end": "</s>",
        "template": (
            "{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
            "{% else %}{{ raise_exception('roles must be user and assistant') }}{% endif %}{% endfor %}"),
    },
    "gemma": {
        "specials": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>", "eos": "<eos>", "end": "<end_of_turn>",
        "template": (
            "{{ bos_token }}{% for m in messages %}"
            "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
            "<start_of_turn>{{ role }}\n"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<end_of_turn>{% endgeneration %}"
            "{% else %}{{ m['content'] | trim }}<end_of_turn>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    },
    # DeepSeek-R1 style: earlier assistant turns lose their reasoning (the text up to </think>).
    "deepseek": {
        "specials": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        "bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "end": "<｜end▁of▁sentence｜>",
        "template": (
            "{{ bos_token }}{% set ns = namespace(last_user=-1) %}"
            "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% else %}{% set content = m['content'] %}"
            "{% if loop.index0 < ns.last_user and '</think>' in content %}{% set content = content.split('</think>')[-1] | trim %}{% endif %}"
            "<｜Assistant｜>{% generation %}{{ content }}<｜end▁of▁sentence｜>{% endgeneration %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"),
    },
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "12 + 30 = 42.\nThe answer is 42."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": " hi! "}, {"role": "user", "content": "Count to three"},
     {"role": "assistant", "content": "one, two, three"}],
    [{"role": "user", "content": "Think: 2+3?"}, {"role": "assistant", "content": "<think>2 and 3 make 5</think>It is 5."},
     {"role": "user", "content": "And 2+4?"}, {"role": "assistant", "content": "<think>one more</think>It is 6."}],
    [{"role": "user", "content": "Café? 中文 🙂"}, {"role": "assistant", "content": "Oui: café crème. 🙂"}],
]


def untagged(template: str) -> str:
    """The template without its generation blocks (same text, no markers)."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def save_hf_tokenizer(directory: Path, style: str, template: str | None = None, vocab_size: int = 400):
    """Train a byte-level BPE with the style's special tokens (and pre-tokenizer) and save it with
    transformers' ``save_pretrained`` (tokenizer.json, tokenizer_config.json naming the family's
    tokenizer class as published files do, chat template). Returns the transformers tokenizer."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = STYLES[style]
    tok = Tokenizer(models.BPE())
    if "split" in spec:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"])
    hf.chat_template = spec["template"] if template is None else template
    hf.save_pretrained(str(directory))
    if "tokenizer_class" in spec:
        config_file = Path(directory) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = spec["tokenizer_class"]
        config_file.write_text(json.dumps(config, indent=2))
    return hf
