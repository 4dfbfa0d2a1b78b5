"""A published LLaVA checkpoint through the one loader: transformers' ``LlavaForConditionalGeneration``
(SigLIP tower, GELU projector, a Llama or Qwen2 language model) written with ``save_pretrained`` loads
with ``load_model`` and gives transformers' logits on prompts holding images (<= 1e-4), in transformers
5's names and in transformers 4's; the layouts it cannot express are refused by name."""
from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import Transformer  # noqa: E402
from model.hf_interop import to_hf  # noqa: E402
from model.load import load_model  # noqa: E402
from tests.model.test_hf_parity import CONFIGS  # noqa: E402
from utils.errors import UserError  # noqa: E402

IMAGE_TOKEN = 5
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4)


def hf_llava(family: str, feature_layer: int = -1, **extra):
    cfg = CONFIGS[family]
    _, text = to_hf(Transformer(cfg).state_dict(), cfg)
    text_config = transformers.AutoConfig.for_model(**text)
    llava = transformers.LlavaConfig(
        vision_config=transformers.SiglipVisionConfig(**SIGLIP), text_config=text_config, image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy="full", vision_feature_layer=feature_layer, projector_hidden_act="gelu",
        image_seq_length=16, **extra)
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(llava).eval()
    with torch.no_grad():
        for p in hf.parameters():  # away from the init's zeros and ones: a dropped weight shows
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    img = [IMAGE_TOKEN] * 16
    ids = torch.tensor([[1, 7, *img, 9, 10, *img, 11], [2, *img, 6, 7, 8, *img, 12]])
    return ids, torch.rand(4, 3, 16, 16) * 2 - 1


def assert_same_logits(hf, path):
    ours = load_model(path)
    assert ours.cfg.vision is not None and ours.cfg.image_tokens == 16
    ids, pixels = prompts()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, image_embeds=ours.encode_images(pixels))
    assert (got - want).abs().max() <= 1e-4
    return ours


@pytest.mark.parametrize("family, feature_layer", [("llama3", -1), ("qwen2", -2), ("llama3", 2)])
def test_a_saved_llava_loads_with_the_same_logits(tmp_path, family, feature_layer):
    hf = hf_llava(family, feature_layer)
    hf.save_pretrained(tmp_path / "llava")
    ours = assert_same_logits(hf, tmp_path / "llava")
    assert ours.cfg.vision["n_layers"] == (3 if feature_layer == -1 else 2)  # -2 and 2: the second of 3 layers


def test_the_engine_generates_what_transformers_generates(tmp_path):
    """The imported LLaVA through the engine (paged KV cache, images encoded at prefill) decodes greedily
    the tokens transformers' generate() gives for the same prompts and images."""
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams

    hf = hf_llava("qwen2", -2)
    hf.save_pretrained(tmp_path / "llava")
    engine = LLMEngine(load_model(tmp_path / "llava"), max_num_seqs=2)
    ids, pixels = prompts()
    outs = engine.generate([row.tolist() for row in ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                           images=[pixels[:2], pixels[2:]])
    for row, image, out in zip(ids, (pixels[:2], pixels[2:]), outs):
        with torch.no_grad():
            want = hf.generate(input_ids=row[None], pixel_values=image, max_new_tokens=6, do_sample=False,
                               min_new_tokens=6)[0, len(row):]
        assert out.outputs[0].token_ids == want.tolist()


def published_llava(d):
    """A LLaVA directory as published: weights and config by save_pretrained, a tokenizer with an <image>
    token and a ChatML template. Returns (transformers model, transformers tokenizer, <image> id)."""
    from tests.data_pipeline.hf_style import save_hf_tokenizer

    hf_tok = save_hf_tokenizer(d, "chatml")
    hf_tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    hf_tok.save_pretrained(str(d))
    image_id = hf_tok.convert_tokens_to_ids("<image>")
    cfg = CONFIGS["qwen2"]
    _, text = to_hf(Transformer(cfg).state_dict(), cfg)
    text.update(vocab_size=len(hf_tok), bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                max_position_embeddings=128)
    llava = transformers.LlavaConfig(
        vision_config=transformers.SiglipVisionConfig(**SIGLIP), text_config=transformers.AutoConfig.for_model(**text),
        image_token_index=image_id, vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu", image_seq_length=16)
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(llava).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(str(d))
    return hf, hf_tok, image_id


def test_a_published_layout_llava_answers_through_the_server(tmp_path):
    """A LLaVA directory as published (weights, config, tokenizer with an <image> token and a chat
    template) behind our server: the official openai client's image_url request gets the reply that
    transformers' generate() gives for the template's prompt with the image's tokens."""
    openai = pytest.importorskip("openai")
    from data_pipeline.images import encode_png_data_url, to_pixels
    from data_pipeline.synthetic import visual
    from inference import server
    from inference.async_engine import AsyncEngine
    from inference.engine import LLMEngine
    from model.load import load
    from tests.inference import test_server_helpers as H

    d = tmp_path / "llava"
    hf, hf_tok, image_id = published_llava(d)
    model, tok = load(d)
    settings = server.ServerSettings(model_name="llava", max_model_len=128, max_tokens_cap=8, n_cap=1)
    app = server.build_app(AsyncEngine(LLMEngine(model, tokenizer=tok, max_num_seqs=2), max_concurrent=4), tok, settings)
    image = visual.render(visual.random_scene(random.Random(5)))
    question = "How many shapes are there?"
    with H.LiveServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="llava", temperature=0, max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": encode_png_data_url(image)}}, {"type": "text", "text": question}]}])
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "<image>\n" + question}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    at = ids.index(image_id)
    ids = ids[:at] + [image_id] * 16 + ids[at + 1:]
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=to_pixels([image], 16), max_new_tokens=6,
                          do_sample=False)[0, len(ids):]
    assert reply.usage.prompt_tokens == len(ids) and len(out) > 0
    assert reply.choices[0].message.content == hf_tok.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama3", "llama_mqa_tied", "qwen2"])
def test_our_vlm_exports_as_a_llava_that_transformers_loads(tmp_path, family):
    """export_hf of our vision-language model: transformers' LlavaForConditionalGeneration loads every
    weight (none missing, none left over) and gives our logits; load_model reads it back unchanged."""
    from model import ModelConfig
    from model.hf_interop import export_hf
    from tests.model.test_vision import randomize

    vision = {"image_size": 16, "patch_size": 4, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64,
              "image_token_id": IMAGE_TOKEN}
    model = Transformer(ModelConfig.from_dict({**CONFIGS[family].to_dict(), "vision": vision})).eval()
    randomize(model)
    export_hf(model, tmp_path / "out")
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, pixels = prompts()
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, pixel_values=pixels).logits
        got = model(ids, image_embeds=model.encode_images(pixels))
    assert (got - want).abs().max() <= 1e-4
    back = load_model(tmp_path / "out").state_dict()
    assert set(back) == set(model.state_dict()) and all(torch.equal(back[k], t) for k, t in model.state_dict().items())
    refused = Transformer(ModelConfig.from_dict({**CONFIGS[family].to_dict(), "vision": {**vision, "pool": 2}}))
    with pytest.raises(UserError, match="cannot express"):
        export_hf(refused, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_published_llava_finetunes_on_llava_layout_data(tmp_path):
    """Stage 2 (finetune/vlm_train.py) from a published LLaVA directory on rows in LLaVA's own layout
    (a .json list of {image, conversations}): the language model and projector train, the tower does not,
    and the result loads and is still a LLaVA that exports."""
    import base64

    from data_pipeline.images import encode_png_data_url
    from data_pipeline.synthetic import visual
    from finetune.vlm import run_vlm
    from finetune.vlm_recipe import VLMRecipe
    from utils.config import config_from_dict

    d = tmp_path / "llava"
    published_llava(d)
    (tmp_path / "pics").mkdir()
    rows = []
    for i, ex in enumerate(visual.make_examples(3, "train", "qa")):
        png = base64.b64decode(encode_png_data_url(ex["image"]).split(",", 1)[1])
        (tmp_path / f"pics/{i}.png").write_bytes(png)
        turns = [{"from": "human" if m["role"] == "user" else "gpt",
                  "value": m["content"] if isinstance(m["content"], str) else "<image>\n" + "".join(
                      p["text"] for p in m["content"] if p["type"] == "text")} for m in ex["messages"]]
        rows.append({"id": str(i), "image": f"pics/{i}.png", "conversations": turns})
    (tmp_path / "llava_instruct.json").write_text(json.dumps(rows))
    recipe = config_from_dict(VLMRecipe, {
        "stage": "instruct", "model": {"init_from": str(d)},
        "data": {"train_path": str(tmp_path / "llava_instruct.json")},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "seq_len": 96, "progress": False,
                  "resume": "never"},
        "optim": {"lr": 1e-2, "warmup_steps": 0}})
    run_vlm(recipe)
    before, after = load_model(d).state_dict(), load_model(tmp_path / "run/final").state_dict()
    for name, t in before.items():
        assert torch.equal(t, after[name]) == name.startswith("vision.tower."), name
    from model.hf_interop import export_hf

    export_hf(load_model(tmp_path / "run/final"), tmp_path / "export")
    assert json.loads((tmp_path / "export/config.json").read_text())["model_type"] == "llava"


# transformers 5.24's save_pretrained writes language_model.model.*, language_model.lm_head.*, vision_tower.*
# (its SigLIP tower has no vision_model wrapper) and multi_modal_projector.*. transformers 4 (llava-hf's
# releases) wrote vision_tower.vision_model.*; transformers 5's module names (state_dict()) are model.*.
LAYOUTS = {
    "transformers 4": [("vision_tower.", "vision_tower.vision_model.")],
    "transformers 5 modules": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                               ("vision_tower.", "model.vision_tower."),
                               ("multi_modal_projector.", "model.multi_modal_projector.")],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_writers_names_load_too(tmp_path, layout):
    from safetensors.torch import load_file, save_file

    hf = hf_llava("llama3")
    hf.save_pretrained(tmp_path / "saved")
    renamed = {}
    for name, t in load_file(str(tmp_path / "saved/model.safetensors")).items():
        for written, other in LAYOUTS[layout]:
            if name.startswith(written):
                name = other + name[len(written):]
                break
        renamed[name] = t
    assert any(k.startswith(LAYOUTS[layout][-1][1]) for k in renamed)
    (tmp_path / "other").mkdir()
    save_file(renamed, str(tmp_path / "other/model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "other/config.json").write_text((tmp_path / "saved/config.json").read_text())
    assert_same_logits(hf, tmp_path / "other")


@pytest.mark.parametrize("change, match", [
    ({"vision_feature_select_strategy": "default"}, "drops the tower's first feature"),
    ({"vision_feature_layer": [-2, -1]}, "not the embeddings or a list"),
    ({"projector_hidden_act": "silu"}, "projector is not linear -> GELU -> linear"),
    ({"vision_config": {"model_type": "clip_vision_model"}}, "vision tower is 'clip_vision_model'"),
])
def test_what_it_cannot_express_is_refused(tmp_path, change, match):
    hf = hf_llava("llama3")
    hf.save_pretrained(tmp_path / "llava")
    config = json.loads((tmp_path / "llava/config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (tmp_path / "llava/config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=match):
        load_model(tmp_path / "llava")


def test_a_llava_around_gemma_is_refused_both_ways(tmp_path):
    """transformers' LLaVA scales the image features with Gemma's embeddings and drops its final soft-cap;
    ours does neither, so both directions refuse rather than differ."""
    from model import ModelConfig
    from model.hf_interop import export_hf

    hf_llava("gemma2").save_pretrained(tmp_path / "llava")
    with pytest.raises(UserError, match="Gemma-style language model"):
        load_model(tmp_path / "llava")
    vision = {"image_size": 16, "patch_size": 4, "d_model": 32, "n_heads": 4, "n_layers": 1, "d_ff": 64,
              "image_token_id": IMAGE_TOKEN}
    with pytest.raises(UserError, match="Gemma-style language model"):
        export_hf(Transformer(ModelConfig.from_dict({**CONFIGS["gemma2"].to_dict(), "vision": vision})), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_exported_vlm_runs_in_transformers_with_its_processor(tmp_path):
    """`hf_convert.py export` of our vision-language checkpoint writes AutoProcessor's files too:
    transformers' LlavaProcessor expands the image token (the tokenizer's <|pad|>) to the image's tokens
    and prepares the pixels as our engine does, and the exported model's logits on that input are ours."""
    from PIL import Image

    from data_pipeline.images import to_pixels
    from data_pipeline.synthetic import visual
    from model import ModelConfig
    from model.hf_convert import main as convert
    from tests.inference import test_server_helpers as H
    from tests.model.test_vision import randomize
    from utils.checkpoint import save_checkpoint

    tok_path = H.train_tokenizer(tmp_path / "tokenizer.json")
    vision = {"image_size": 24, "patch_size": 8, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64,
              "image_token_id": 4}  # <|pad|>
    cfg = ModelConfig.from_dict({**CONFIGS["llama3"].to_dict(), "vocab_size": 400, "vision": vision})
    ours = Transformer(cfg).eval()
    randomize(ours)
    save_checkpoint(tmp_path / "vlm", ours, tokenizer_path=tok_path)
    convert(["export", "--checkpoint", str(tmp_path / "vlm"), "--out", str(tmp_path / "hf")])
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image = visual.render(visual.random_scene(random.Random(2)))
    batch = processor(text="<|pad|>\nHow many shapes are there?", images=Image.fromarray(image), return_tensors="pt")
    assert int((batch["input_ids"] == 4).sum()) == cfg.image_tokens == 9
    pixels = to_pixels([image], 24)
    assert (batch["pixel_values"] - pixels).abs().max() <= 1e-5
    with torch.no_grad():
        want = hf(**batch).logits
        got = ours(batch["input_ids"], image_embeds=ours.encode_images(pixels))
    assert (got - want).abs().max() <= 1e-4
