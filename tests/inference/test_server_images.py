"""Images through the OpenAI-compatible server with the official openai client: image_url parts with
data URLs reach the engine; remote URLs, corrupt images, images for a text-only model and more
images than the context holds are 400s in the OpenAI error shape."""
from __future__ import annotations

import base64
import io
import random

import httpx
import numpy as np
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.images import encode_png_data_url, to_pixels
from data_pipeline.synthetic import visual
from data_pipeline.tokenizer.chat_template import chat_stop_ids
from data_pipeline.vision_chat import IMAGE_MARKER, render_with_images
from inference import server
from inference.async_engine import AsyncEngine
from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from model import ModelConfig, Transformer
from tests.inference import test_server_helpers as H
from tests.model.test_vision import randomize
from utils.errors import UserError

MODEL = "tiny-vlm"
VISION = {"image_size": 24, "patch_size": 8, "d_model": 32, "n_heads": 4, "n_layers": 1, "d_ff": 64, "image_token_id": 4}


def start(tok, vision: dict | None, max_len: int = 64):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=max_len,
                                    vision=vision)).eval()
    randomize(model)
    engine = LLMEngine(model, tokenizer=tok, max_num_seqs=4)
    settings = server.ServerSettings(model_name=MODEL, max_model_len=max_len, max_tokens_cap=16, n_cap=2)
    return engine, server.build_app(AsyncEngine(engine, max_concurrent=8), tok, settings)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def live(tok):
    engine, app = start(tok, VISION)
    with H.LiveServer(app) as url:
        yield url, engine


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


IMAGE = visual.render(visual.random_scene(random.Random(3)))


def ask(url_or_image, text: str = "How many shapes are there?") -> list[dict]:
    url = url_or_image if isinstance(url_or_image, str) else encode_png_data_url(url_or_image)
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def test_an_image_reaches_the_model(live, tok):
    url, engine = live
    reply = client_of(url).chat.completions.create(model=MODEL, messages=ask(IMAGE), temperature=0, max_tokens=8)
    # the same request straight into an engine of its own over the same weights: the server's loop thread
    # steps the live engine, and a second thread stepping it would take that thread's outputs
    ids, _ = render_with_images(tok, [{"role": "user", "content": IMAGE_MARKER + "\nHow many shapes are there?"}], 1, 4, 9,
                                add_generation_prompt=True)
    direct = LLMEngine(engine.model, tokenizer=tok, max_num_seqs=4)
    want = direct.generate([ids], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=chat_stop_ids(tok)),
                           images=[to_pixels([IMAGE], 24)])[0].outputs[0]
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == tok.decode(want.token_ids)
    other = client_of(url).chat.completions.create(model=MODEL, messages=ask(255 - IMAGE), temperature=0, max_tokens=8,
                                                   logprobs=True)
    first = client_of(url).chat.completions.create(model=MODEL, messages=ask(IMAGE), temperature=0, max_tokens=8,
                                                   logprobs=True)
    # another picture, another distribution over the first token (the image is read, not ignored)
    assert other.choices[0].logprobs.content[0].logprob != first.choices[0].logprobs.content[0].logprob


@pytest.mark.parametrize("messages, match", [
    (ask("https://example.com/cat.png"), "does not fetch remote images"),
    (ask("data:image/png;base64,iVBORw0KGgoAAAAA"), "could not be decoded"),
    (ask("data:text/plain;base64,aGk="), "base64 image data URL"),
    (ask(IMAGE) + [{"role": "assistant", "content": "1"}] + ask(IMAGE) + ask(IMAGE) + ask(IMAGE) + ask(IMAGE)
     + ask(IMAGE) + ask(IMAGE) + ask(IMAGE), "more than the model's context"),
])
def test_bad_images_are_400s(live, messages, match):
    with pytest.raises(openai.BadRequestError) as err:
        client_of(live[0]).chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert match in err.value.body["message"] and err.value.body["param"] == "messages"


def test_an_image_for_a_text_only_model_is_a_400(tok):
    _, app = start(tok, None)
    with H.LiveServer(app) as url:
        with pytest.raises(openai.BadRequestError, match="no vision encoder"):
            client_of(url).chat.completions.create(model=MODEL, messages=ask(IMAGE), max_tokens=4)
        ok = client_of(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_huge_image_is_a_400(live):
    big = np.zeros((4097, 4097, 3), np.uint8)
    with pytest.raises(openai.BadRequestError, match="pixels"):
        client_of(live[0]).chat.completions.create(model=MODEL, messages=ask(big), max_tokens=4)


def test_terminal_chat_attaches_images(tok, tmp_path):
    """inference/chat.py's /image: the file's pixels reach the engine with the next message (the reply
    equals the engine's own on that prompt and image), history keeps them, trimming drops a turn's
    image with it, and bad files or a text-only model are one-line errors."""
    import io

    from data_pipeline.images import load_image_file
    from inference.chat import chat_loop, reply
    from inference.serve_recipe import ChatRecipe

    files = []
    for seed in (3, 4):
        path = tmp_path / f"scene{seed}.png"
        path.write_bytes(__import__("base64").b64decode(encode_png_data_url(visual.render(visual.random_scene(random.Random(seed)))).split(",", 1)[1]))
        files.append(path)
    engine, _ = start(tok, VISION, max_len=48)
    args = ChatRecipe(checkpoint="unused", temperature=0.0, max_tokens=6, stats=True)

    def expected(image_path, text: str) -> str:
        ids, _ = render_with_images(tok, [{"role": "user", "content": f"{IMAGE_MARKER}\n{text}"}], 1, 4, 9, add_generation_prompt=True)
        params = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=list(chat_stop_ids(tok)))
        return reply(engine, ids, params, io.StringIO(), to_pixels([load_image_file(image_path)], 24))[0]

    stdin = (f"/image {files[0]}\nHow many?\n/image {tmp_path / 'missing.png'}\n/image\nsee <image>\n"
             f"/image {files[1]}\nAnd this?\n/exit\n")
    out, err = io.StringIO(), io.StringIO()
    chat_loop(engine, tok, args, io.StringIO(stdin), out, err)
    replies = [line for line in out.getvalue().split("\n") if line and not line.startswith("(image")]
    assert out.getvalue().count("attached to your next message") == 2
    assert replies[0] == expected(files[0], "How many?")
    assert "does not exist" in err.getvalue() and "/image needs a file" in err.getvalue()
    assert "attach images with /image PATH" in err.getvalue()
    prompts = [int(n) for n in __import__("re").findall(r"\[(\d+) prompt tokens", err.getvalue())]
    assert len(prompts) == 2 and prompts[1] <= 48  # the second turn fits by dropping the first (and its image)
    assert replies[1] == expected(files[1], "And this?")  # alone now, with its own image
    text_engine, _ = start(tok, None)
    err = io.StringIO()
    chat_loop(text_engine, tok, args, io.StringIO(f"/image {files[0]}\n"), io.StringIO(), err)
    assert "no vision encoder" in err.getvalue()


def test_a_direct_generate_on_the_served_engine_is_refused(live):
    """The server's loop thread steps the engine; a direct generate() would take its outputs (and
    wait forever for its own), so it is refused with a message that says what to do instead."""
    _, engine = live
    with pytest.raises(UserError, match="second LLMEngine"):
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))


def _encoded(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(IMAGE).save(buf, format=fmt)
    return buf.getvalue()


ENCODED = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP")}


@st.composite
def damaged_data_url(draw) -> str:
    """A real image's bytes with a few of them changed or the tail cut, as a data URL under some MIME type."""
    data = bytearray(ENCODED[draw(st.sampled_from(sorted(ENCODED)))])
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    data = data[: draw(st.integers(1, len(data)))]
    mime = draw(st.sampled_from(["image/png", "image/jpeg", "image/webp", "text/plain", "image/x"]))
    return f"data:{mime};base64," + base64.b64encode(bytes(data)).decode()


url_values = damaged_data_url() | st.text(max_size=30) | st.none() | st.integers() | st.just("data:image/png;base64,")
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": url_values}, optional={"detail": st.sampled_from(["auto", "low", "high", "huge", None])})}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": url_values}),
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "input_image", "bogus"])},
                          optional={"text": st.text(max_size=20) | st.integers(), "image": url_values}),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(part, max_size=4), stream=st.booleans())
def test_fuzzed_image_parts_never_500(live, parts, stream):
    """Content parts shaped like the real thing, with damaged images (changed bytes, cut tails, wrong MIME
    types), non-URL values and unknown part types: every answer is a 200 or a 400 in the OpenAI shape."""
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": parts or "hi"}]}
    r = httpx.post(f"{live[0]}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    if r.status_code == 400:
        H.assert_error_shape(r, 400)
