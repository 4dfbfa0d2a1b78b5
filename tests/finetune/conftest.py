import torch

# Tiny models: one thread avoids oversubscribing the shared CPU cores (faster, not slower).
torch.set_num_threads(1)
