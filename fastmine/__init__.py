"""fastmine: fused, exact triplet mining for deep metric learning.

    res = fastmine.mine(embeddings, labels)      # easy positive, hard negative
    loss = torch.relu(res.pos_dist - res.neg_dist + 0.1)[res.valid].mean()
"""
from . import reference
from ._backends import available as available_backends
from ._extension import build_info
from .mine import MineFunction, MiningResult, mine, mine_topk
from .reference_topk import TopKResult
from . import losses, miners
from .memory import CrossBatchMemory
from . import distributed  # import-safe without torch.distributed: it raises only when called

__version__ = "0.1.0"

__all__ = ["mine", "mine_topk", "MineFunction", "MiningResult", "TopKResult", "reference", "available_backends", "build_info", "__version__",
           "losses", "miners", "CrossBatchMemory", "distributed"]

# Optional backends register themselves on import: 'triton' (when present in
# this checkout) registers only if triton imports, and is usable on CUDA tensors,
# or on CPU tensors under TRITON_INTERPRET=1.  Errors inside it are not hidden.
import importlib.util as _importlib_util

if _importlib_util.find_spec(__name__ + "._triton") is not None:
    from . import _triton  # noqa: F401
