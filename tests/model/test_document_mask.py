"""Document masking in packed rows: an example inside a pack gets the logits it has alone (fp32,
<= 1e-5), for every attention variant; SFT and pretraining batches carry it end to end."""
import numpy as np
import pytest
import torch

from data_pipeline.loader import restart_positions
from model import ModelConfig, Transformer
from model.attention import document_ids
from utils.errors import UserError

BASE = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
VARIANTS = {
    "gqa_rope": {},
    "sliding_window": dict(sliding_window=4),
    "alibi_softcap": dict(pos_emb="alibi", attn_logit_softcap=20.0),
    "learned_positions": dict(pos_emb="learned", norm="layernorm", ffn="gelu_mlp", activation="gelu"),
    "mla_moe": dict(attention="mla", mla=MLA, n_kv_heads=None, ffn="moe",
                    moe=dict(n_routed_experts=4, n_experts_per_tok=2, moe_d_ff=16, first_k_dense=1)),
}
LENGTHS = [7, 12, 5]  # three examples packed into one row of 24, plus a second row holding one


def packed_row(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = [torch.randint(1, 96, (n,), generator=g) for n in lengths]
    x = torch.cat(examples)[None]  # (1, T)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return examples, x, positions


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_example_in_a_pack_has_its_logits_alone(variant):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, **VARIANTS[variant]})).eval()
    examples, x, positions = packed_row(LENGTHS)
    with torch.no_grad():
        packed = model(x, positions=positions, documents=document_ids(positions))
        unmasked = model(x)  # today's packing: later examples see earlier ones
        start = 0
        for i, ex in enumerate(examples):
            alone = model(ex[None])
            part = slice(start, start + len(ex))
            assert (packed[0, part] - alone[0]).abs().max().item() <= 1e-5, i
            if i:  # without the mask the later examples' logits differ: the test can tell
                assert (unmasked[0, part] - alone[0]).abs().max().item() > 1e-3, i
            start += len(ex)


def test_batch_rows_mask_independently_and_gradients_stay_inside_a_document():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE))
    _, x, positions = packed_row(LENGTHS)
    x2, pos2 = torch.randint(1, 96, (1, 24)), torch.arange(24)[None]
    x, positions = torch.cat([x, x2]), torch.cat([positions, pos2])
    embedded = []
    model.embed.register_forward_hook(lambda m, i, out: embedded.append(out.retain_grad() or out))
    out = model(x, positions=positions, documents=document_ids(positions))
    out[0, 7 + 12 - 1].sum().backward()  # the last token of the second example
    touched = embedded[0].grad.abs().sum(-1)  # what reached each input embedding
    assert touched[0, :7].sum() == 0 and touched[0, 19:].sum() == 0 and touched[1].sum() == 0
    assert (touched[0, 7:19] > 0).all()


def test_document_ids_and_restart_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])  # two examples, then padding at 0
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3, 4, 5]]
    starts = np.array([[False, False, True, False, True, False]])  # an EOS opens each document
    assert restart_positions(starts).tolist() == [[0, 1, 0, 1, 0, 1]]


def test_linear_attention_refuses_document_masks():
    model = Transformer(ModelConfig(**{**BASE, "attention": "linear"}))
    _, x, positions = packed_row(LENGTHS)
    with pytest.raises(UserError, match="document_mask: false"):
        model(x, positions=positions, documents=document_ids(positions))
