"""CRD's contrast indices as the CRD benchmark draws them (its CIFAR100InstanceSample), but
for a whole batch at once on the batch's device.

For an anchor of class c, row [positive, K negatives]:
- the negatives are drawn uniformly from the training samples of the OTHER classes, without
  replacement when that pool holds at least K samples, and with replacement when K exceeds
  it (the reference's fallback: numpy's choice(pool, K, replace=K > len(pool)));
- the positive is the sample itself (mode "exact", the benchmark's default) or a sample of
  class c drawn uniformly, the sample itself included (mode "relax").

The draws use the global random generator of the batch's device, which the training loop
checkpoints on every rank, so a resumed run draws what an uninterrupted one would; under DDP
every rank draws for its own samples from its own stream.
"""
from __future__ import annotations

import torch
from torch import nn

POSITIVE_MODES = ("exact", "relax")
DEFAULT_NUM_NEGATIVES = 16384  # the benchmark's nce_k
# Random keys drawn at once by the without-replacement draw (rows x training samples):
# bounds its memory (256 MB of float32) on ImageNet-sized training sets.
KEY_BUDGET = 1 << 26


def _uniform_below(bounds: torch.Tensor, columns: int) -> torch.Tensor:
    """(rows, columns) integers, each uniform in [0, bounds[row]); float64 keys keep the
    rounding bias far below sampling error for any pool a data set can have."""
    draws = torch.rand(bounds.shape[0], columns, dtype=torch.float64, device=bounds.device)
    picks = (draws * bounds.unsqueeze(1)).long()
    return torch.minimum(picks, bounds.unsqueeze(1) - 1)


class ClassAwareNegatives(nn.Module):
    """forward(indices) -> (B, 1 + K) training-set indices: column 0 the positive, then the
    K negatives of each anchor (see the module's docstring)."""

    def __init__(self, labels: torch.Tensor, num_negatives: int = DEFAULT_NUM_NEGATIVES,
                 mode: str = "exact"):
        super().__init__()
        if mode not in POSITIVE_MODES:
            raise ValueError(f"CRD mode must be one of {POSITIVE_MODES}, got {mode!r}")
        if isinstance(num_negatives, bool) or int(num_negatives) != num_negatives \
                or num_negatives < 1:
            raise ValueError(f"the number of negatives must be a positive integer, "
                             f"got {num_negatives!r}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D integer tensor (one class per training "
                             f"sample), got shape {tuple(labels.shape)} and {labels.dtype}")
        labels = labels.long().cpu()
        if len(labels) == 0 or int(labels.min()) < 0:
            raise ValueError("labels must be class indices >= 0, one per training sample")
        counts = torch.bincount(labels)
        present = counts > 0
        if int(present.sum()) < 2:
            raise ValueError(f"class-aware negatives need at least two classes in the "
                             f"training set; its {len(labels)} samples are all of class "
                             f"{int(labels[0])}")
        self.num_negatives, self.mode = int(num_negatives), mode
        # Samples sorted by class: class c holds positions [start[c], start[c] + count[c]),
        # and position p of c's negative pool is sorted_samples[p + count[c] (p >= start[c])].
        # Derived from the labels, hence not in checkpoints; equal on every rank.
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("sorted_samples", torch.argsort(labels, stable=True),
                             persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    # Buffers a DDP wrapper need not broadcast (see Distiller.replicated_buffers).
    buffer_names = ("labels", "sorted_samples", "class_start", "class_count")

    @property
    def num_samples(self) -> int:
        return self.labels.shape[0]

    def pool_sizes(self, classes: torch.Tensor) -> torch.Tensor:
        """How many training samples are of another class than each of `classes`."""
        return self.num_samples - self.class_count[classes]

    def forward(self, indices: torch.Tensor, labels: torch.Tensor = None) -> torch.Tensor:
        """indices: (B,) training-set indices of the anchors; labels, when given, the batch's
        labels, checked against the training set's."""
        self._check(indices, labels)
        classes = self.labels[indices]
        positives = indices if self.mode == "exact" else self._same_class(classes)
        pools = self.pool_sizes(classes)
        distinct = pools >= self.num_negatives
        if bool(distinct.all()):  # the usual case (CIFAR, ImageNet): no boolean indexing
            negatives = self._without_replacement(classes)
        elif not bool(distinct.any()):  # every pool smaller than K (few-sample data sets)
            negatives = self._with_replacement(classes, pools)
        else:
            negatives = torch.empty(indices.shape[0], self.num_negatives, dtype=torch.long,
                                    device=indices.device)
            if bool(distinct.any()):
                negatives[distinct] = self._without_replacement(classes[distinct])
            repeat = ~distinct
            negatives[repeat] = self._with_replacement(classes[repeat], pools[repeat])
        return torch.cat([positives.unsqueeze(1), negatives], dim=1)

    def _check(self, indices, labels):
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"indices must be a 1-D integer tensor of training-set indices, "
                             f"got shape {tuple(indices.shape)} and {indices.dtype}")
        if indices.device != self.labels.device:
            raise ValueError(f"indices are on {indices.device}, the sampler's labels on "
                             f"{self.labels.device}")
        if indices.numel() and bool(((indices < 0) | (indices >= self.num_samples)).any()):
            raise ValueError(f"indices must lie in [0, {self.num_samples}), the training set's "
                             f"size; got {int(indices.min())}..{int(indices.max())}")
        if labels is not None and not torch.equal(labels.to(self.labels.device).long(),
                                                  self.labels[indices]):
            raise ValueError("the batch's labels differ from the training set's labels read "
                             "at start-up (a target transform, or indices of another data "
                             "set?): class-aware negatives would be drawn from wrong classes")

    def _same_class(self, classes: torch.Tensor) -> torch.Tensor:
        offsets = _uniform_below(self.class_count[classes], 1).squeeze(1)
        return self.sorted_samples[self.class_start[classes] + offsets]

    def _with_replacement(self, classes: torch.Tensor, pools: torch.Tensor) -> torch.Tensor:
        positions = _uniform_below(pools, self.num_negatives)
        skip = positions >= self.class_start[classes].unsqueeze(1)
        return self.sorted_samples[positions + skip * self.class_count[classes].unsqueeze(1)]

    def _without_replacement(self, classes: torch.Tensor) -> torch.Tensor:
        # A uniform K-subset of the pool: the K smallest of i.i.d. uniform keys, the anchor's
        # own class keyed above every uniform key (so never among the K).
        rows_per_chunk = max(1, KEY_BUDGET // self.num_samples)
        picks = []
        for chunk in torch.split(classes, rows_per_chunk):
            keys = torch.rand(chunk.shape[0], self.num_samples, device=chunk.device)
            keys.masked_fill_(self.labels.unsqueeze(0) == chunk.unsqueeze(1), 2.0)
            picks.append(keys.topk(self.num_negatives, dim=1, largest=False,
                                   sorted=False).indices)
        return torch.cat(picks) if len(picks) > 1 else picks[0]
