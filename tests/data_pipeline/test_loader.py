"""Loaders read exactly the right tokens and masks, are deterministic, resumable, and refuse bad bins."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from data_pipeline.jsonl import load_jsonl
from data_pipeline.loader import PreferenceLoader, PretrainLoader, SFTLoader
from data_pipeline.tokenizer.chat_template import render_chat
from data_pipeline.tokenizer.tokenizer import Tokenizer
from utils.errors import UserError


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return all(torch.equal(u, v) for u, v in zip(a, b))


def check_resume(make, n_before: int = 2, n_after: int = 4) -> None:
    """Batches after load_state_dict equal the uninterrupted run's."""
    full = make()
    reference = [next(full) for _ in range(n_before + n_after)]
    first = make()
    for _ in range(n_before):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    assert all(same(next(resumed), ref) for ref in reference[n_before:])


def test_pretrain_windows_come_from_the_stream(pipeline_dir):
    path = pipeline_dir / "bins/pretrain/train.bin"
    meta = json.loads((pipeline_dir / "bins/pretrain/meta.json").read_text())
    tokens = np.fromfile(path, dtype=meta["dtype"]).astype(np.int64)
    x, y = next(PretrainLoader(path, seq_len=32, batch_size=4, seed=1))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 33)
    for b in range(4):
        row = np.concatenate([x[b].numpy(), y[b, -1:].numpy()])
        assert (windows == row).all(axis=1).any()


def test_pretrain_deterministic_resumable_and_rank_dependent(pipeline_dir):
    path = pipeline_dir / "bins/pretrain/train.bin"
    check_resume(lambda: PretrainLoader(path, 16, 3, seed=4))
    r0, r1 = PretrainLoader(path, 16, 3, seed=4, rank=0, world_size=2), PretrainLoader(path, 16, 3, seed=4, rank=1, world_size=2)
    assert not torch.equal(next(r0)[0], next(r1)[0])


def test_pretrain_refuses_corrupt_bins_and_other_tokenizer(pipeline_dir, tmp_path):
    bins = tmp_path / "pretrain"
    shutil.copytree(pipeline_dir / "bins/pretrain", bins)
    meta = json.loads((bins / "meta.json").read_text())
    PretrainLoader(bins / "train.bin", 16, 2, expect_tokenizer_hash=meta["tokenizer_hash"])
    with pytest.raises(UserError, match="tokenizer"):
        PretrainLoader(bins / "train.bin", 16, 2, expect_tokenizer_hash="0123456789abcdef")
    with open(bins / "train.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 3)
    with pytest.raises(UserError, match="truncated"):
        PretrainLoader(bins / "train.bin", 16, 2)
    (bins / "meta.json").write_text("{oops")
    with pytest.raises(UserError, match="corrupted"):
        PretrainLoader(bins / "val.bin", 16, 2)


def rendered_examples(pipeline_dir, split: str) -> dict[tuple, list[int]]:
    tok = Tokenizer.from_file(pipeline_dir / "tokenizer/tokenizer.json")
    out = {}
    for row in load_jsonl(pipeline_dir / f"raw/sft_{split}.jsonl"):
        ids, mask = render_chat(tok, row["messages"])
        out[tuple(ids)] = mask
    return out


def test_sft_rows_hold_whole_examples_with_exact_masks(pipeline_dir):
    examples = rendered_examples(pipeline_dir, "val")
    loader = SFTLoader(pipeline_dir / "bins/sft", "val", seq_len=300, batch_size=4, seed=0, return_position_ids=True)
    n_packed = 0
    for _ in range(3):
        x, y, loss_mask, pos = next(loader)
        assert x.shape == y.shape == loss_mask.shape == pos.shape == (4, 300) and loss_mask.dtype == torch.float32
        for b in range(4):
            row = torch.cat([x[b], y[b, -1:]]).tolist()
            target_mask = [0.0] + loss_mask[b].tolist()  # target_mask[i] is the mask of row[i]
            # Padding is <|endoftext|>, which render_chat never emits: the first one ends the content.
            filled = row.index(0) if 0 in row else len(row)
            starts = [i for i in range(min(filled, 300)) if pos[b, i] == 0]
            assert all(row[s] == 1 for s in starts)  # each example starts with <|bos|>
            n_packed += len(starts) > 1
            for s, e in zip(starts, starts[1:] + [filled]):
                seg = tuple(row[s:e])
                assert seg in examples, "a row holds a cut or foreign example"
                assert target_mask[s:e] == [float(m) for m in examples[seg]]
            assert not any(target_mask[filled:])  # padding is never learned
    assert n_packed > 0


def test_sft_no_pack_one_example_per_row_and_resume(pipeline_dir):
    loader = SFTLoader(pipeline_dir / "bins/sft", "val", seq_len=300, batch_size=4, seed=0, pack=False,
                       return_position_ids=True)
    x, _, _, pos = next(loader)
    assert (x[:, 0] == 1).all() and ((pos == 0) & (x == 1)).sum(dim=1).eq(1).all()
    # 20 val examples / 4 rows per batch: 8 batches cross two epoch boundaries.
    check_resume(lambda: SFTLoader(pipeline_dir / "bins/sft", "val", 64, 4, seed=2, rank=1, world_size=2), 3, 5)


def test_sft_offsets_point_into_the_token_file(pipeline_dir):
    """return_offsets: where each x token sits in {split}.bin (-1 on padding), packed or not."""
    for pack in (True, False):
        loader = SFTLoader(pipeline_dir / "bins/sft", "val", seq_len=64, batch_size=4, seed=1, pack=pack,
                           return_position_ids=True, return_offsets=True)
        tokens = loader.tokens
        for _ in range(3):
            x, _, _, pos, offsets = next(loader)
            real = offsets >= 0
            assert torch.equal(torch.from_numpy(tokens[offsets[real].numpy()].astype("int64")), x[real])
            within = (pos[:, 1:] == pos[:, :-1] + 1) & real[:, 1:]  # the next token of the same example
            assert torch.equal(offsets[:, 1:][within], offsets[:, :-1][within] + 1)
            assert (x[~real] == loader.pad_id).all()


def test_preference_masks_cover_exactly_the_reply(pipeline_dir):
    tok = Tokenizer.from_file(pipeline_dir / "tokenizer/tokenizer.json")
    rows = load_jsonl(pipeline_dir / "raw/preference_val.jsonl")
    loader = PreferenceLoader(pipeline_dir / "bins/preference", "val", seq_len=400, batch_size=3, seed=0)
    for _ in range(4):
        batch = next(loader)
        for b in range(3):
            prompt_len = int(batch["prompt_len"][b])
            for side in ("chosen", "rejected"):
                ids, mask = batch[f"{side}_ids"][b], batch[f"{side}_mask"][b]
                n = int(batch[f"{side}_len"][b])
                assert int(batch[f"{side}_attention_mask"][b].sum()) == n and (ids[n:] == tok.pad_id).all()
                learned = ids[1:][mask[:-1].bool()].tolist()  # targets under the mask
                assert mask[-1] == 0 and mask[:prompt_len - 1].sum() == 0
                text = tok.decode(learned, skip_special_tokens=False)
                prompt = tok.decode(ids[:prompt_len].tolist())
                match = [r for r in rows if r[side] + "<|im_end|>" == text and r["prompt"][-1]["content"] in prompt]
                assert match, f"{side} mask does not cover exactly one reply"
    check_resume(lambda: PreferenceLoader(pipeline_dir / "bins/preference", "val", 256, 4, seed=5))


# Document masking in packed rows (model/attention.py AttnMask; tests/model/test_document_mask.py for the model)


def test_packed_sft_loss_is_the_sum_of_each_example_alone(pipeline_dir):
    """Through the real SFT bins and loss: a packed batch's assistant-token loss equals the
    weighted sum of the losses of its examples run one by one."""
    from finetune.sft import sft_loss
    from model import ModelConfig, Transformer

    loader = SFTLoader(pipeline_dir / "bins/sft", "val", seq_len=300, batch_size=2, seed=0, return_position_ids=True)
    x, y, mask, pos = next(loader)
    torch.manual_seed(0)
    vocab = json.loads((pipeline_dir / "bins/sft/meta.json").read_text())["vocab_size"]
    model = Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                    max_seq_len=512)).eval()
    with torch.no_grad():
        packed, m = sft_loss(model, (x, y, mask, pos))
        total, weight, n_examples = 0.0, 0.0, 0
        for b in range(x.shape[0]):
            starts = (pos[b] == 0).nonzero().flatten().tolist() + [x.shape[1]]
            for s, e in zip(starts, starts[1:]):
                if mask[b, s:e].sum() == 0:
                    continue  # padding
                loss, mi = sft_loss(model, (x[b:b + 1, s:e], y[b:b + 1, s:e], mask[b:b + 1, s:e]))
                total, weight, n_examples = total + float(loss) * mi["loss_weight"], weight + mi["loss_weight"], n_examples + 1
        assert n_examples > x.shape[0]  # rows really were packed
        assert m["loss_weight"] == weight
        assert abs(float(packed) - total / weight) <= 1e-5
        unmasked, _ = sft_loss(model, (x, y, mask))
        assert abs(float(unmasked) - total / weight) > 1e-4


def test_pretrain_windows_restart_positions_at_each_document(pipeline_dir):
    path = pipeline_dir / "bins/pretrain/train.bin"
    eos = json.loads((pipeline_dir / "bins/pretrain/meta.json").read_text())["eos_id"]
    plain = next(PretrainLoader(path, seq_len=64, batch_size=4, seed=1))
    x, y, pos = next(PretrainLoader(path, seq_len=64, batch_size=4, seed=1, document_mask=True))
    assert torch.equal(x, plain[0]) and torch.equal(y, plain[1])  # the same windows
    assert ((x == eos) == ((pos == 0) & (torch.arange(64) > 0))).all()  # a document opens at its EOS
    assert (x == eos).any()
    for b in range(4):
        for t in range(1, 64):
            assert pos[b, t] == (0 if x[b, t] == eos else pos[b, t - 1] + 1)
