"""Tiny models run fastest on one thread: on a shared 2-core machine, intra-op threads of
many small matmuls spend more time waiting for each other than computing (measured 10x)."""
import torch

torch.set_num_threads(1)
