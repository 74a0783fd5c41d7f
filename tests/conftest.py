import torch

# Tests run single-threaded: CI machines have 2 cores and results must not depend on it.
torch.set_num_threads(1)
