import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Our Triton kernels run on CPU tensors in Triton's interpreter; it must be on before the
    # kernel modules are imported (triton.jit decides at decoration time).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny checkpoint written by `make_tiny_checkpoint` (our tokenizer, processor files)."""
    from fast_dvlm_sglang.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)
