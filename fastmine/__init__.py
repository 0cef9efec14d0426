"""fastmine: fused, exact triplet mining for deep metric learning.

    res = fastmine.mine(embeddings, labels)      # easy positive, hard negative
    loss = torch.relu(res.pos_dist - res.neg_dist + 0.1)[res.valid].mean()
"""
from . import reference
from ._backends import available as available_backends
from ._extension import build_info
from .mine import MineFunction, MiningResult, mine
from . import losses, miners
from .memory import CrossBatchMemory

__version__ = "0.1.0"

__all__ = ["mine", "MineFunction", "MiningResult", "reference", "available_backends", "build_info", "__version__",
           "losses", "miners", "CrossBatchMemory"]

# Optional backends register themselves on import (never raising when their
# dependency is missing): 'triton' needs triton and CUDA tensors, or CPU
# tensors under TRITON_INTERPRET=1.
try:
    from . import _triton  # noqa: F401
except ImportError:  # the module itself is absent only in partial checkouts
    pass
