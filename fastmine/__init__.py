"""fastmine: fused, exact triplet mining for deep metric learning.

    res = fastmine.mine(embeddings, labels)      # easy positive, hard negative
    terms = torch.relu(res.pos_dist - res.neg_dist + 0.1) * res.valid  # 0 without a triplet
    loss = fastmine.losses.reduce_terms(terms, res.valid)  # mean over valid anchors; 0 if none

(``...[res.valid].mean()`` would be NaN for a batch without a valid anchor:
reduce_terms returns an exact 0 that is still attached to the graph.)  The
loss modules do this for you: ``fastmine.losses`` (triplet-style, mined) and
``fastmine.contrastive`` (SupCon, NT-Xent, Multi-Similarity, streamed).
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

__all__ = [
    # mining
    "mine", "mine_topk", "MineFunction", "MiningResult", "TopKResult",
    # training helpers
    "CrossBatchMemory",
    # backends and the build
    "available_backends", "build_info", "__version__",
    # public submodules (bound by the imports above)
    "contrastive", "distributed", "losses", "memory", "miners", "reference",
    "reference_contrastive", "reference_topk",
]

# Optional backends register themselves on import: 'triton' (when present in
# this checkout) registers only if triton imports, and is usable on CUDA tensors,
# or on CPU tensors under TRITON_INTERPRET=1.  Errors inside it are not hidden.
import importlib.util as _importlib_util

if _importlib_util.find_spec(__name__ + "._triton") is not None:
    from . import _triton  # noqa: F401
