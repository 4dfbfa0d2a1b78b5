"""Tensor, pipeline and 2-D (FSDP2 x TP) parallelism on gloo CPU processes against one process with the
same global batch: the same losses (<= 1e-5) over several steps, bitwise resume, and the recipe's
layout checked against the world size with clear errors."""
import json

import pytest
import torch

from tests.utils.helpers import MOE, SEQ, TINY, StreamLoader, ce_loss, held_out_loss, launch, tiny_model
from utils.checkpoint import load_weights
from utils.distributed import DistEnv, _check_layout
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.train_config import ParallelConfig
from utils.train_loop import TrainConfig, train

STEPS, GLOBAL_ROWS = 3, 4  # 2 rows per micro-batch: one process accumulates 2, as do tp and pp (dp 1); dp 2 x tp 2 takes 1
TWO = ("none:adamw:tp2:eval,none:muon:tp2,none:adamw:tp2:moe,none:adamw:pp2:eval,none:adamw:pp2:gpipe,"
       "none:adamw:tp2:long,none:adamw:tp2:term,none:adamw:tp2:resume,"
       "none:adamw:pp2:long,none:adamw:pp2:term,none:adamw:pp2:resume")
FOUR = "fsdp:adamw:tp2:eval,fsdp:adamw:tp2:moe,fsdp:adamw:tp2:long,fsdp:adamw:tp2:term,fsdp:adamw:tp2:resume"


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_pp")
    codes, outputs = launch(str(out), TWO, STEPS, GLOBAL_ROWS)
    assert codes == [0, 0], "\n".join(o[-4000:] for o in outputs)
    return out


@pytest.fixture(scope="module")
def four_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_tp")
    codes, outputs = launch(str(out), FOUR, STEPS, GLOBAL_ROWS, world=4, timeout=600)
    assert codes == [0] * 4, "\n".join(o[-4000:] for o in outputs)
    return out


def one_process(tmp_path, optim="adamw", cfg=TINY, eval_fn=None):
    """(losses, gradient norms, final eval) of the same training in one process."""
    torch.set_num_threads(1)
    train_cfg = TrainConfig(out_dir=str(tmp_path / optim), max_steps=STEPS, batch_size=2, seq_len=SEQ,
                            global_batch_size=GLOBAL_ROWS, device="cpu", resume="never", progress=False)
    res = train(tiny_model(cfg=cfg), StreamLoader(2), ce_loss, train_cfg, OptimConfig(name=optim, lr=1e-2, warmup_steps=1),
                eval_fn=eval_fn)
    return [h["loss"] for h in res.history], [h["grad_norm"] for h in res.history], res.final_eval


def history(runs, name, what="history"):
    return json.loads((runs / name / f"{what}.json").read_text())


def assert_same_run(runs, name, ref_losses, ref_norms):
    """Losses within 1e-5, and gradient norms too (Adam and Muon hide a wrongly scaled gradient from
    the loss; the norm, taken before clipping, shows it)."""
    got, norms = history(runs, name), history(runs, name, "grad_norms")
    assert len(got) == len(ref_losses) == STEPS and ref_losses[0] != ref_losses[-1]
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) <= 1e-5, (got, ref_losses)
    assert max(abs(a - b) / b for a, b in zip(norms, ref_norms)) <= 1e-5, (norms, ref_norms)


@pytest.mark.slow  # 11 runs in 2 processes
@pytest.mark.parametrize("run,optim,cfg", [
    ("none_adamw_tp2_eval", "adamw", TINY), ("none_muon_tp2", "muon", TINY), ("none_adamw_tp2_moe", "adamw", MOE),
    ("none_adamw_pp2_eval", "adamw", TINY), ("none_adamw_pp2_gpipe", "adamw", TINY),
])
def test_tensor_and_pipeline_parallel_match_one_process(two_process_runs, tmp_path, run, optim, cfg):
    losses, norms, _ = one_process(tmp_path, optim, cfg)
    assert_same_run(two_process_runs, run, losses, norms)


@pytest.mark.slow  # 5 runs in 4 processes
@pytest.mark.parametrize("run,cfg", [("fsdp_adamw_tp2_eval", TINY), ("fsdp_adamw_tp2_moe", MOE)])
def test_fsdp2_x_tp_matches_one_process(four_process_runs, tmp_path, run, cfg):
    losses, norms, _ = one_process(tmp_path, "adamw", cfg)
    assert_same_run(four_process_runs, run, losses, norms)


@pytest.mark.slow
@pytest.mark.parametrize("fixture,layout", [("two_process_runs", "none_adamw_tp2"), ("two_process_runs", "none_adamw_pp2"),
                                            ("four_process_runs", "fsdp_adamw_tp2")])
def test_interrupted_and_resumed_is_bitwise_the_uninterrupted_run(request, fixture, layout):
    """SIGTERM on rank 1 in step 2, a checkpoint of the whole model, resumed in the same layout: the
    same losses and final weights, bit for bit."""
    runs = request.getfixturevalue(fixture)
    assert history(runs, f"{layout}_long") == history(runs, f"{layout}_term") and len(history(runs, f"{layout}_term")) == STEPS + 2
    a, b = load_weights(runs / f"{layout}_long" / "final"), load_weights(runs / f"{layout}_term" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = tiny_model().state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in whole.items()}  # every stage / shard, gathered


@pytest.mark.slow
def test_evaluation_sees_the_whole_model(two_process_runs, four_process_runs, tmp_path):
    _, _, ref = one_process(tmp_path, eval_fn=held_out_loss)
    for runs, name in ((two_process_runs, "none_adamw_tp2_eval"), (two_process_runs, "none_adamw_pp2_eval"),
                       (four_process_runs, "fsdp_adamw_tp2_eval")):
        got = json.loads((runs / name / "final_eval.json").read_text())
        assert abs(got["val_loss"] - ref["val_loss"]) <= 1e-5, (name, got, ref)


@pytest.mark.slow
def test_resume_in_another_layout_is_refused_with_the_way_forward(two_process_runs):
    from utils.train_state import read_resume_state

    step = two_process_runs / "none_adamw_tp2_long" / f"step_{STEPS + 2:08d}"
    as_pipeline = DistEnv(0, 2, 0, torch.device("cpu"), "none", tp=1, pp=2)
    with pytest.raises(UserError, match="resumes in its own layout.*init_from"):
        read_resume_state(step, tiny_model(), as_pipeline, "adamw")


@pytest.mark.parametrize("world,kind,parallel,message", [
    (3, "fsdp", dict(tp=2), "does not divide the 3 process"),
    (4, "fsdp", dict(tp=2, dp=4), "dp=4 x tp=2 x pp=1 = 8 processes, but 4 were launched"),
    (4, "ddp", dict(tp=2), "needs train.distributed=fsdp"),
    (4, "fsdp", dict(pp=2), "pipeline parallelism is built for one model copy"),
    (4, "none", dict(tp=2, pp=2), "pipeline parallelism is built for one model copy"),
])
def test_layout_is_checked_against_the_world_size(world, kind, parallel, message):
    with pytest.raises(UserError, match=message):
        _check_layout(world, kind, **{"dp": 0, "tp": 1, "pp": 1, **parallel})
    assert _check_layout(4, "fsdp", tp=2, pp=1, dp=0) == 2 and _check_layout(2, "none", tp=1, pp=2, dp=0) == 1


def test_ranks_on_the_mesh():
    """rank = (pp_rank * dp + dp_rank) * tp + tp_rank: a tp group is neighbouring ranks."""
    envs = [DistEnv(r, 8, r, torch.device("cpu"), "fsdp", tp=2, pp=2) for r in range(8)]
    assert [e.dp_size for e in envs] == [2] * 8
    assert [e.dp_rank for e in envs] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [e.pp_rank for e in envs] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_model_and_recipe_refusals():
    from model.pipeline import check_pipeline, stage_layers
    from model.tensor_parallel import check_tensor_parallel

    with pytest.raises(UserError, match="n_kv_heads=2 is not a multiple of tp=4"):
        check_tensor_parallel(tiny_model(), 4)
    with pytest.raises(UserError, match="pp=3 stages but only 2 layers"):
        check_pipeline(tiny_model(), 3)
    with pytest.raises(UserError, match="MoE"):
        check_pipeline(tiny_model(cfg=MOE), 2)
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)] and stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(UserError, match="must be >= 1"):
        ParallelConfig(tp=0)
