"""One torch thread per test process. `make test` runs two pytest workers on two cores; with
torch's default of one intra-op thread per core, the workers' OpenMP threads oversubscribe the
cores and spin-wait on each other (tiny models ran 4-10x slower). Subprocesses the tests start
inherit OMP_NUM_THREADS."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
