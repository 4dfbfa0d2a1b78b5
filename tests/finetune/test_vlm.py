"""LLaVA-style stages (finetune/vlm.py): what each stage trains (and what it must not touch),
the batches, the loss with images, the recipe's refusals."""
from __future__ import annotations

import base64
import json

import pytest
import torch

from data_pipeline.images import encode_png_data_url
from data_pipeline.jsonl import write_jsonl
from data_pipeline.synthetic import visual
from finetune.vlm import ImageChatBatches, build_vlm, encode_rows, vlm_loss
from finetune.vlm_recipe import VLMRecipe
from model import ModelConfig, Transformer
from tests.inference import test_server_helpers as H
from utils.checkpoint import save_checkpoint
from utils.config import config_from_dict
from utils.errors import UserError

VISION = {"image_size": 24, "patch_size": 8, "d_model": 32, "n_heads": 4, "n_layers": 1, "d_ff": 64, "image_token_id": 4}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tokenizer, a text-only checkpoint, and caption / question files in the local layout."""
    root = tmp_path_factory.mktemp("vlm")
    tok_path = H.train_tokenizer(root / "tokenizer.json")
    tok = H.load_tokenizer(tok_path)
    (root / "images").mkdir()
    for kind in ("caption", "qa"):
        rows = []
        for i, row in enumerate(visual.make_examples(6, "train", kind)):
            png = base64.b64decode(encode_png_data_url(row["image"]).split(",", 1)[1])
            (root / f"images/{kind}{i}.png").write_bytes(png)
            rows.append({"messages": row["messages"], "images": [f"images/{kind}{i}.png"]})
        write_jsonl(root / f"{kind}.jsonl", rows)
    torch.manual_seed(0)
    text = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=256))
    save_checkpoint(root / "text", text, tokenizer_path=tok_path)
    return root, tok


def recipe(root, stage: str, train_tower: bool = False, **model) -> VLMRecipe:
    return config_from_dict(VLMRecipe, {
        "stage": stage, "train_tower": train_tower, "model": model or {"init_from": str(root / "text"), "vision": VISION},
        "data": {"train_path": str(root / ("caption.jsonl" if stage == "align" else "qa.jsonl"))},
        "train": {"out_dir": str(root / f"run_{stage}"), "max_steps": 3, "batch_size": 4, "seq_len": 200, "progress": False,
                  "resume": "never"},
        "optim": {"lr": 1e-2, "warmup_steps": 0}})


@pytest.mark.parametrize("stage, tower, trains", [("text", False, {"lm"}), ("align", False, {"projector"}),
                                                  ("instruct", False, {"lm", "projector"}),
                                                  ("instruct", True, {"lm", "projector", "tower"})])
def test_each_stage_trains_only_its_part(task, stage, tower, trains):
    from finetune.vlm import run_vlm
    from model.load import load_model

    root, _ = task
    r = recipe(root, stage, tower)
    torch.manual_seed(0)  # the fresh vision part is drawn the same way in both builds
    before = build_vlm(r).state_dict()
    torch.manual_seed(0)
    run_vlm(r)
    after = load_model(root / f"run_{stage}" / "final").state_dict()
    for name, old in before.items():
        part = "tower" if name.startswith("vision.tower.") else "projector" if name.startswith("vision.projector.") else "lm"
        changed = not torch.equal(old, after[name])
        if part in trains and name.endswith("weight") and "norm" not in name:
            assert changed, f"{stage}: {name} did not train"
        if part not in trains:
            assert not changed, f"{stage}: {name} changed but is frozen"


def test_stage_2_with_lora_adapts_the_language_model_only(task):
    """lora in stage 2: adapters on the LM's linear layers (none in the tower, whose q/k/v share the
    names), the projector trained in full, an adapter checkpoint the loader merges over stage 1."""
    from finetune.vlm import run_vlm
    from model.load import load_model
    from model.lora import lora_layers
    from utils.checkpoint import read_meta

    root, _ = task
    align = recipe(root, "align")
    align.train.out_dir = str(root / "lora_base")
    torch.manual_seed(0)
    run_vlm(align)
    base_dir = root / "lora_base" / "final"
    r = config_from_dict(VLMRecipe, {
        "stage": "instruct", "model": {"init_from": str(base_dir)}, "lora": {"r": 4, "alpha": 8},
        "data": {"train_path": str(root / "qa.jsonl")},
        "train": {"out_dir": str(root / "lora_run"), "max_steps": 3, "batch_size": 4, "seq_len": 200, "progress": False,
                  "resume": "never"},
        "optim": {"lr": 1e-2, "warmup_steps": 0}})
    run_vlm(r)
    out = root / "lora_run" / "final"
    meta = read_meta(out)
    assert meta["kind"] == "adapter" and "vision.projector" in meta["lora"]["modules_to_save"]
    assert meta["lora_layers"] and not [n for n in meta["lora_layers"] if n.startswith("vision.")]
    live = load_model(out, merge=False)
    assert set(lora_layers(live)) == set(meta["lora_layers"])
    before, after = load_model(base_dir).state_dict(), load_model(out).state_dict()  # merged on load
    for name, old in before.items():
        changed = not torch.equal(old, after[name])
        if name.startswith("vision.tower."):
            assert not changed, name
        elif name.startswith("vision.projector.") or (name.endswith("proj.weight") and not name.startswith("vision.")):
            assert changed, name
    with pytest.raises(UserError, match="lora applies to stage instruct"):
        config_from_dict(VLMRecipe, {"stage": "align", "model": {"init_from": str(base_dir)}, "lora": {"r": 4},
                                     "data": {"train_path": str(root / "caption.jsonl")},
                                     "train": {"out_dir": str(root / "x"), "max_steps": 1, "batch_size": 1, "seq_len": 8}})


def test_batches_and_loss_see_the_images(task):
    root, tok = task
    cfg = build_vlm(recipe(root, "instruct")).cfg
    rows = encode_rows(str(root / "qa.jsonl"), "", tok, cfg, 200, with_images=True)
    assert all(r["ids"].count(4) == 9 and r["pixels"].shape == (1, 3, 24, 24) for r in rows)
    batches = ImageChatBatches(rows, 4, seed=0, pad_id=tok.eos_id)
    batch = next(batches)
    assert batch["pixels"].shape[0] == 4 and int((batch["x"] == 4).sum()) == 36
    counted = batch["y"] != -100
    assert 0 < int(counted.sum()) < counted.numel()  # the answers only
    model = build_vlm(recipe(root, "instruct"))
    loss, metrics = vlm_loss(model, batch)
    blank = {**batch, "pixels": torch.zeros_like(batch["pixels"])}
    assert metrics["loss_weight"] == int(counted.sum()) and float(vlm_loss(model, blank)[0].detach()) != float(loss.detach())
    state = batches.state_dict()
    nxt = next(batches)
    batches.load_state_dict(state)
    assert torch.equal(next(batches)["x"], nxt["x"])  # resumable
    text_rows = encode_rows(str(root / "qa.jsonl"), "", tok, cfg, 200, with_images=False)
    assert all(4 not in r["ids"] and r["pixels"].shape[0] == 0 for r in text_rows)


def test_llava_layout_reads_as_the_messages_layout(task):
    """LLaVA's published files (a .json list of {"id", "image", "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", ...}]}, text-only rows without "image") give the same
    tokens, masks and pixels as the same chats in the messages layout; eval/visual_qa reads them too."""
    from data_pipeline.jsonl import iter_jsonl
    from data_pipeline.vision_chat import split_images
    from eval.visual_qa import load_rows

    root, tok = task
    cfg = build_vlm(recipe(root, "instruct")).cfg
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    messages_rows, llava_rows = [], []
    for i, row in enumerate(iter_jsonl(root / "qa.jsonl")):
        chat, _ = split_images(row["messages"], row["images"], root)  # "<image>" markers in strings
        llava_rows.append({"id": f"{i:012d}", "image": row["images"][0],
                           "conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in chat]})
        messages_rows.append(row)
    text_only = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    messages_rows.append({"messages": text_only})
    llava_rows.append({"id": "text", "conversations": [{"from": speaker[m["role"]], "value": m["content"]}
                                                         for m in text_only]})
    write_jsonl(root / "as_messages.jsonl", messages_rows)
    (root / "llava.json").write_text(json.dumps(llava_rows))
    want = encode_rows(str(root / "as_messages.jsonl"), "", tok, cfg, 200, with_images=True)
    got = encode_rows(str(root / "llava.json"), "", tok, cfg, 200, with_images=True)
    assert len(got) == len(want) == len(messages_rows) and got[-1]["pixels"].shape[0] == 0
    for a, b in zip(got, want):
        assert a["ids"] == b["ids"] and a["mask"] == b["mask"] and torch.equal(a["pixels"], b["pixels"])
    assert [r["answer"] for r in load_rows(str(root / "llava.json"))] == [r["answer"] for r in load_rows(
        str(root / "as_messages.jsonl"))]
    (root / "bad.json").write_text(json.dumps([{"image": "images/qa0.png", "caption": "a red square"}]))
    with pytest.raises(UserError, match="bad.json item 0 has keys .* 'conversations' \\(LLaVA\\)"):
        encode_rows(str(root / "bad.json"), "", tok, cfg, 200, with_images=True)
    (root / "bad.json").write_text(json.dumps([{"image": "images/qa0.png",
                                                "conversations": [{"from": "narrator", "value": "hi"}]}]))
    with pytest.raises(UserError, match="bad.json item 0: conversations\\[0\\] has from='narrator'"):
        encode_rows(str(root / "bad.json"), "", tok, cfg, 200, with_images=True)


@pytest.mark.parametrize("layout", ["SiglipVisionModel", "SiglipModel"])
def test_a_pretrained_siglip_tower_starts_the_vlm(task, tmp_path, layout):
    """model.vision_tower: a transformers save_pretrained SigLIP directory (the vision model alone, or the
    image-text model whose vision half is read) gives the tower its sizes and weights: our tower's
    features equal transformers' last encoder layer (what LLaVA reads) on the same pixels."""
    transformers = pytest.importorskip("transformers")
    root, _ = task
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=24, patch_size=8)
    torch.manual_seed(1)
    if layout == "SiglipVisionModel":
        hf = transformers.SiglipVisionModel(vc).eval()
        tower = hf
    else:
        tc = transformers.SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, vocab_size=100, bos_token_id=1, eos_token_id=2)
        hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=tc.to_dict(), vision_config=vc.to_dict())).eval()
        tower = hf.vision_model
    with torch.no_grad():
        for p in hf.parameters():  # away from the init's zeros and ones, so a dropped weight shows
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "siglip")
    model = build_vlm(recipe(root, "align", init_from=str(root / "text"), vision={"image_token_id": 4},
                             vision_tower=str(tmp_path / "siglip")))
    v = model.cfg.vision
    assert (v["d_model"], v["n_layers"], v["d_ff"], v["image_size"], v["patch_size"]) == (32, 2, 64, 24, 8)
    pixels = torch.rand(2, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        want = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        got = model.vision.tower.eval()(pixels)
    assert (got - want).abs().max() <= 1e-4
    with pytest.raises(UserError, match="model.vision sets n_layers=1 but the tower .* has n_layers=2"):
        build_vlm(recipe(root, "align", init_from=str(root / "text"), vision={"image_token_id": 4, "n_layers": 1},
                         vision_tower=str(tmp_path / "siglip")))
    with pytest.raises(UserError, match="needs model.vision too"):
        recipe(root, "align", init_from=str(root / "text"), vision_tower=str(tmp_path / "siglip"))
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=24,
        patch_size=8)).save_pretrained(tmp_path / "clip")
    with pytest.raises(UserError, match="'clip_vision_model' model; a vision tower is read from a SigLIP"):
        build_vlm(recipe(root, "align", init_from=str(root / "text"), vision={"image_token_id": 4},
                         vision_tower=str(tmp_path / "clip")))


def test_recipe_refusals(task):
    root, _ = task
    with pytest.raises(UserError, match="exactly one of model.init_from"):
        recipe(root, "align", init_from=str(root / "text"), config={"vocab_size": 10})
    with pytest.raises(UserError, match="text-only model; add model.vision"):
        build_vlm(recipe(root, "align", init_from=str(root / "text")))
    with pytest.raises(UserError, match="stage"):
        recipe(root, "pretrain")
    with pytest.raises(UserError, match="train_tower applies to stage instruct"):
        recipe(root, "align", train_tower=True)
    with pytest.raises(UserError, match="raise train.seq_len"):
        encode_rows(str(root / "caption.jsonl"), "", task[1], build_vlm(recipe(root, "align")).cfg, 20, True)
    with pytest.raises(UserError, match="context \\(max_seq_len\\) is 16"):
        cfg = build_vlm(recipe(root, "align")).cfg
        cfg.max_seq_len = 16
        encode_rows(str(root / "caption.jsonl"), "", task[1], cfg, 200, True)


def test_example_recipes_validate(tmp_path, monkeypatch):
    from pathlib import Path

    from utils.config import load_config

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    for f in ("qa_train.jsonl", "caption_train.jsonl", "tokenizer/tokenizer.json"):
        (tmp_path / "data/visual" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data/visual" / f).write_text("{}\n")
    for d in ("text", "align"):
        (tmp_path / "runs/vlm" / d / "final").mkdir(parents=True)
    stages = [load_config(VLMRecipe, p).stage for p in sorted((repo / "configs/examples/vlm").glob("*.yaml"))]
    assert stages == ["text", "align", "instruct", "instruct"]  # 2_instruct and 2_instruct_lora
