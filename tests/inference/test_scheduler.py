"""Scheduler: admission limits, padded token budget, chunked prefill, decode, preemption order."""
from inference.block_manager import BlockManager
from inference.sampling_params import SamplingParams
from inference.scheduler import Scheduler
from inference.sequence import Sequence, Status

_ids = iter(range(10**6))


def seq(n_tokens, n=1):
    s = Sequence(next(_ids), f"r{n_tokens}", list(range(n_tokens)), SamplingParams(n=n))
    s.pending_forks = n - 1
    return s


def run(sched, batch):
    """What the engine does after a forward: count the computed tokens, start finished prefills,
    and append a fake sampled token."""
    for s, q in zip(batch.seqs, batch.q_lens):
        s.num_computed += q
        if s.num_computed == s.num_tokens:
            if s.status == Status.WAITING:
                sched.started(s)
            s.token_ids.append(1)


def make(num_blocks=20, block_size=4, max_num_seqs=8, max_tokens=64, lookahead=0):
    return Scheduler(BlockManager(num_blocks, block_size, False), max_num_seqs, max_tokens, lookahead)


def test_prefill_first_then_decode():
    sched = make()
    a, b = seq(5), seq(3)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a, b] and batch.q_lens == [5, 3] and batch.starts == [0, 0]
    run(sched, batch)
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [a, b] and batch.q_lens == [1, 1] and batch.starts == [5, 3]


def test_max_num_seqs_counts_the_n_siblings():
    sched = make(max_num_seqs=4)
    a, b = seq(3, n=3), seq(3, n=2)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a]  # a reserves 3 of 4 rows; b needs 2


def test_padded_token_budget_and_chunked_prefill():
    sched = make(max_tokens=8)
    long, short = seq(20), seq(3)
    sched.add(long)
    sched.add(short)
    batches = []
    while long.status == Status.WAITING:
        batch = sched.schedule()
        assert batch.is_prefill and batch.seqs[0] is long
        assert len(batch.seqs) * max(batch.q_lens) <= 8  # rows x longest row
        batches.append((batch.q_lens, batch.starts))
        run(sched, batch)
    # the 20-token prompt in chunks of 8; the short one joins once the padded batch fits (2 x 4)
    assert batches == [([8], [0]), ([8], [8]), ([4, 3], [16, 0])]
    assert not sched.schedule().is_prefill


def test_preempts_the_newest_when_blocks_run_out():
    sched = make(num_blocks=4, block_size=2)
    a, b = seq(3), seq(3)  # 2 blocks each: all 4 used
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())  # prefill
    run(sched, sched.schedule())  # decode position 3, still inside block 1
    assert sched.bm.num_free_blocks == 0
    batch = sched.schedule()  # both need a third block for position 4: b is preempted
    assert batch.preempted == [b] and batch.seqs == [a]
    assert b.status == Status.WAITING and b.num_computed == 0 and b.block_table == [] and sched.waiting[0] is b
    assert b.token_ids == list(range(3)) + [1, 1]  # sampled tokens survive preemption
    assert sched.num_preemptions == 1


def test_a_sequence_alone_without_room_preempts_itself():
    sched = make(num_blocks=2, block_size=2)
    a = seq(3)
    sched.add(a)
    run(sched, sched.schedule())
    run(sched, sched.schedule())
    a.token_ids.append(2)  # pretend it needs position 5 too; the engine's never-fit check prevents this
    assert sched.schedule() is None and sched.waiting[0] is a


def test_lookahead_reserves_slots_for_speculation():
    sched = make(num_blocks=20, block_size=4, lookahead=4)
    a = seq(4)
    sched.add(a)
    run(sched, sched.schedule())
    sched.schedule()
    assert len(a.block_table) * 4 >= a.num_tokens + 4
