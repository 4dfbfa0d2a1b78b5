"""Images through the engine (inference/images.py): the encoder's tokens in the KV cache equal a
full forward, whichever way the prefill is chunked; prefix caching keyed on image content;
images refused where they cannot apply."""
from __future__ import annotations

import pytest
import torch

from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from model import ModelConfig, Transformer
from tests.model.test_vision import VISION, randomize
from utils.errors import UserError

IMG = 4  # image_token_id


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                                    vision={**VISION, "pool": 2})).eval()  # 4 tokens per image
    randomize(model)
    return model


def pixels(seed: int, n: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def prompt(n_images: int = 1) -> list[int]:
    ids = [1, 7, 9]
    for _ in range(n_images):
        ids += [IMG] * 4 + [12, 13]
    return ids + [20, 21, 22, 23, 24, 25]


def greedy_reference(model, ids: list[int], px: torch.Tensor, n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        embeds = model.encode_images(px)
        for _ in range(n):
            logits = model(torch.tensor([ids]), image_embeds=embeds)
            ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("batched_tokens, block_size", [(2048, 16), (5, 4), (3, 2)])
def test_greedy_with_images_equals_full_forward(vlm, batched_tokens, block_size):
    # chunked prefills of 5 and 3 tokens cut through the image placeholders
    prompts = [prompt(1), prompt(2), prompt(1)[:-2]]
    images = [pixels(1), pixels(2, 2), pixels(3)]
    engine = LLMEngine(vlm, max_num_batched_tokens=batched_tokens, block_size=block_size, num_blocks=200)
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), images=images)
    for p, px, out in zip(prompts, images, outs):
        assert out.outputs[0].token_ids == greedy_reference(vlm, p, px, 6)


def test_prefix_cache_is_keyed_on_the_image(vlm):
    engine = LLMEngine(vlm, block_size=4, num_blocks=100)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = engine.generate([prompt()], params, images=[pixels(1)])[0].outputs[0].token_ids
    hits = engine.bm.prefix_hit_tokens
    other = engine.generate([prompt()], params, images=[pixels(2)])[0].outputs[0].token_ids
    assert engine.bm.prefix_hit_tokens == hits  # same ids, another image: nothing reused
    assert other == greedy_reference(vlm, prompt(), pixels(2), 4) and other != first
    again = engine.generate([prompt()], params, images=[pixels(1)])[0].outputs[0].token_ids
    assert engine.bm.prefix_hit_tokens > hits and again == first  # same image: its blocks are reused


def test_images_are_refused_where_they_cannot_apply(vlm):
    engine = LLMEngine(vlm, block_size=4, num_blocks=50)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(UserError, match="need 8 placeholder tokens"):
        engine.add_request(prompt(1), params, images=pixels(1, 2))
    with pytest.raises(UserError, match="no images"):
        engine.add_request(prompt(1), params)
    with pytest.raises(UserError, match=r"\(n, 3, 16, 16\)"):
        engine.add_request(prompt(1), params, images=torch.zeros(1, 3, 8, 8))
    text_model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=64)).eval()
    with pytest.raises(UserError, match="no vision encoder"):
        LLMEngine(text_model, num_blocks=20).add_request(prompt(1), params, images=pixels(1))
