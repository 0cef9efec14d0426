"""Cross-batch memory (XBM, Wang et al. 2020) with same-sample exclusion."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class CrossBatchMemory(nn.Module):
    """Mine each batch against itself plus a ring buffer of past embeddings.

    Args:
        loss: a fastmine loss module (``fastmine.losses.TripletMarginLoss`` /
            ``MarginLoss``, or anything with their ``forward(embeddings,
            labels, ref_emb, ref_labels, *, query_ids, ref_ids)``).
        embedding_size: D.
        memory_size: capacity of the ring buffer (rows).

    ``forward(embeddings [N, D], labels [N], ids [N] int = None)``:
      1. references = current batch (with gradient) followed by the filled part
         of the memory (detached);
      2. a pair (anchor i, reference j) is never used when ``ids[i] ==
         ref_ids[j]``.  Default ids are a running counter, so every enqueued
         batch has fresh ids and only the anchor's own row in the batch is
         excluded.  Pass dataset sample ids to also exclude the stored copies
         of the same sample from earlier batches (an anchor never mines its own
         stale copy as its "easy positive" -- the bug fixed by
         pytorch-metric-learning PR #524);
      3. the loss is computed, then the batch is enqueued (detached), oldest
         rows overwritten first.

    Buffers: ``embedding_memory`` [memory_size, D] (float32 at construction;
    an empty memory adopts the dtype/device of the first batch), ``label_memory`` / ``id_memory`` [memory_size]
    int64, ``queue_idx`` (next write slot), ``filled`` (rows in use).
    """

    def __init__(self, loss: nn.Module, embedding_size: int, memory_size: int):
        super().__init__()
        if int(embedding_size) < 1 or int(memory_size) < 1:
            raise ValueError(f"embedding_size and memory_size must be >= 1, got "
                             f"{embedding_size}, {memory_size}")
        self.loss = loss
        self.embedding_size, self.memory_size = int(embedding_size), int(memory_size)
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.register_buffer("id_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.queue_idx = 0
        self.filled = 0
        self._next_id = 0  # running counter for default ids

    def reset_queue(self) -> None:
        """Empty the memory (ids of the default counter keep increasing)."""
        self.queue_idx = 0
        self.filled = 0

    def _default_ids(self, n: int, device) -> Tensor:
        # Negative ids so that they never collide with user-supplied dataset
        # ids (>= 0) if the two are mixed across calls.
        ids = -1 - torch.arange(self._next_id, self._next_id + n, device=device)
        self._next_id += n
        return ids

    def forward(self, embeddings: Tensor, labels: Tensor, ids: Optional[Tensor] = None) -> Tensor:
        n = embeddings.shape[0]
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [N, {self.embedding_size}], got "
                             f"{tuple(embeddings.shape)}")
        if labels.shape != (n,):
            raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
        if n > self.memory_size:
            raise ValueError(f"batch size {n} exceeds memory_size {self.memory_size}")
        if ids is None:
            ids = self._default_ids(n, embeddings.device)
        elif ids.shape != (n,) or ids.is_floating_point():
            raise ValueError(f"ids must be an integer tensor of shape [{n}]")
        ids = ids.to(embeddings.device, torch.long)
        if self.filled == 0 and (self.embedding_memory.dtype != embeddings.dtype
                                 or self.embedding_memory.device != embeddings.device):
            # an empty memory adopts the embeddings' dtype/device (no precision loss)
            self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
        labels_l = labels.to(embeddings.device, torch.long)
        mem = self.embedding_memory.to(embeddings.device)
        m = self.filled
        ref_emb = torch.cat([embeddings, mem[:m].to(embeddings.dtype)])
        ref_labels = torch.cat([labels_l, self.label_memory[:m].to(embeddings.device)])
        ref_ids = torch.cat([ids, self.id_memory[:m].to(embeddings.device)])
        out = self.loss(embeddings, labels_l, ref_emb, ref_labels, query_ids=ids, ref_ids=ref_ids)
        self._enqueue(embeddings.detach(), labels_l, ids)
        return out

    @torch.no_grad()
    def _enqueue(self, embeddings: Tensor, labels: Tensor, ids: Tensor) -> None:
        n = embeddings.shape[0]
        slots = (self.queue_idx + torch.arange(n)) % self.memory_size
        slots = slots.to(self.embedding_memory.device)
        self.embedding_memory[slots] = embeddings.to(self.embedding_memory)
        self.label_memory[slots] = labels.to(self.label_memory.device)
        self.id_memory[slots] = ids.to(self.id_memory.device)
        self.queue_idx = (self.queue_idx + n) % self.memory_size
        self.filled = min(self.filled + n, self.memory_size)
