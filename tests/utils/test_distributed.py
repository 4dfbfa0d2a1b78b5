"""2-process gloo runs on CPU (DDP and FSDP2) against one process with the same global batch."""
import json

import pytest
import torch

from tests.utils.helpers import SEQ, StreamLoader, ce_loss, launch, tiny_model
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.train_loop import TrainConfig, train

STEPS, GLOBAL_ROWS = 3, 4  # 2 rows per micro-batch: 2 processes x 1, or 1 process x 2 accumulated


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    codes, outputs = launch(str(out), "ddp:adamw,fsdp:adamw,fsdp:muon,ddp:adamw:term,fsdp:muon:long,fsdp:muon:term,fsdp:muon:resume", STEPS, GLOBAL_ROWS)
    assert codes == [0, 0], "\n".join(o[-4000:] for o in outputs)
    return out


def single_process(tmp_path, optim: str) -> list[float]:
    torch.set_num_threads(1)
    cfg = TrainConfig(out_dir=str(tmp_path / optim), max_steps=STEPS, batch_size=2, seq_len=SEQ, global_batch_size=GLOBAL_ROWS,
                      device="cpu", resume="never", progress=False)
    res = train(tiny_model(), StreamLoader(2), ce_loss, cfg, OptimConfig(name=optim, lr=1e-2, warmup_steps=1))
    return [h["loss"] for h in res.history]


@pytest.mark.parametrize("run,optim", [("ddp_adamw", "adamw"), ("fsdp_adamw", "adamw"), ("fsdp_muon", "muon")])
def test_two_processes_match_one_process(two_process_runs, tmp_path, run, optim):
    dist_losses = json.loads((two_process_runs / run / "history.json").read_text())
    ref = single_process(tmp_path, optim)
    assert len(dist_losses) == len(ref) == STEPS
    assert max(abs(a - b) for a, b in zip(dist_losses, ref)) < 1e-5, (dist_losses, ref)
    assert ref[0] != ref[-1]  # the runs actually trained


def test_resume_with_another_world_size_is_a_user_error(two_process_runs, tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=STEPS + 1, batch_size=2, seq_len=SEQ, global_batch_size=GLOBAL_ROWS,
                      device="cpu", progress=False, resume=str(two_process_runs / "ddp_adamw" / f"step_{STEPS:08d}"))
    with pytest.raises(UserError, match="written by 2 process"):
        train(tiny_model(), StreamLoader(2), ce_loss, cfg, OptimConfig(lr=1e-2, warmup_steps=1))


def test_fsdp_checkpoint_holds_full_weights(two_process_runs):
    from model.load import load_model

    model = load_model(two_process_runs / "fsdp_adamw" / "final")
    ref = tiny_model()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(two_process_runs):
    run = two_process_runs / "ddp_adamw_term"
    # Rank 1 was signalled during step 2; the flag travels in the step's all-reduce, so both
    # ranks finish step 2, write one checkpoint together and stop.
    assert (run / "stopped_rank0").read_text() == (run / "stopped_rank1").read_text() == "2"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000002"]
    from utils.checkpoint import load_train_state

    state = load_train_state(run / "step_00000002")
    assert state["world_size"] == 2 and [r["data"] for r in state["ranks"]] == [{"i": 2}, {"i": 2}]


def test_fsdp_interrupted_and_resumed_matches_uninterrupted(two_process_runs):
    """FSDP2 + Muon: stop at step 2 (SIGTERM), resume from the gathered full-state checkpoint
    in 2 processes, and land on the same losses as the uninterrupted run."""
    long = json.loads((two_process_runs / "fsdp_muon_long" / "history.json").read_text())
    resumed = json.loads((two_process_runs / "fsdp_muon_term" / "history.json").read_text())
    assert len(long) == len(resumed) == STEPS + 2
    assert max(abs(a - b) for a, b in zip(long, resumed)) < 1e-6, (long, resumed)


def test_process_group_is_destroyed_before_the_interpreter_exits(two_process_runs):
    """The workers end without calling destroy_process_group (as SFT and the aligners do):
    utils.distributed.setup's atexit handler destroys it while Python is still whole."""
    assert [(two_process_runs / f"pg_alive_at_exit_rank{r}").read_text() for r in (0, 1)] == ["False", "False"]


@pytest.mark.slow  # 3 launches of 2 processes
def test_every_way_out_of_a_ddp_run_shuts_down_cleanly(tmp_path):
    """A clean return, a UserError (exit 2) and Ctrl-C (exit 130): every rank exits
    with its own code, no abort at shutdown ("terminate called without an active exception",
    seen in 2 of 13 resumed 2-rank runs before), and the group is gone before finalization."""
    for i, (how, code) in enumerate([("ok", 0), ("usererror", 2), ("interrupt", 130)]):
        out = tmp_path / f"{how}{i}"
        codes, outputs = launch(str(out), f"exit:{how}", 2, GLOBAL_ROWS)
        assert codes == [code, code], (how, codes, [o[-2000:] for o in outputs])
        assert not any("terminate called" in o for o in outputs)
        assert [(out / f"pg_alive_at_exit_rank{r}").read_text() for r in (0, 1)] == ["False", "False"]
