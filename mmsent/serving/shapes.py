"""The shapes of a Scorer's model calls, declared in one place: a few fixed batch sizes and caption lengths.

Why: `torch.compile` specialises its code on tensor shapes, and CUDA graphs (`mode="reduce-overhead"`) are recorded
once per shape. With shapes as they come (any number of posts, any caption length) the first posts of every new
shape would pay a compilation; with rows rounded up to a bucket and token widths rounded up to a bucket, the set is
finite and the warm-up (`Scorer.warm_up`) visits all of it before the first post.

    n rows (posts, images) ──rows()──▶ the smallest of batch_sizes ≥ n      (8, 16, 32, ... up to the batch size)
    n head rows (B + 2 per post with both modalities) ──head_rows()──▶ the smallest of head_sizes ≥ n  (... 3 B)
    t caption tokens ──length()──▶ the smallest of lengths ≥ t            (16, 32, 64, ... the encoder's max_length)

The rows added are copies of the last real row, the tokens added are padding (attention mask 0): each row of these
models is computed independently of the others, so the real rows' results do not change, and the copies are cut
off before anything leaves the Scorer.

Also here: the micro-batch size that suits each device (`MMSENT_MAX_BATCH_SIZE`'s default).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["ShapeBuckets", "serving_batch_size"]

# Below 8 rows a GPU call costs about the same as 8 (it is bound by launches, not arithmetic), so smaller buckets
# would only add shapes to compile and warm.
MIN_ROWS = 8
MIN_LENGTH = 16
# Posts per micro-batch. On a GPU a call's fixed costs (kernel launches, copies, the Python around them) are shared
# by hundreds of posts; on the CPU the cost per post is flat past a few dozen and bigger batches only add latency
# (BENCHMARKS.md: batch 32).
SERVING_BATCH_SIZE = {"cuda": 256, "cpu": 32}


def serving_batch_size(device_type: str) -> int:
    """The micro-batch size for a model on this kind of device ("cuda", "cpu", ...; others get the CPU's)."""
    return SERVING_BATCH_SIZE.get(device_type, SERVING_BATCH_SIZE["cpu"])


def _doublings(low: int, high: int) -> tuple[int, ...]:
    """low, 2 low, 4 low, ... up to the first one ≥ high."""
    sizes = [low]
    while sizes[-1] < high:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


@dataclass(frozen=True)
class ShapeBuckets:
    batch_sizes: tuple[int, ...]  # rows of an encoder call (text encoder, CNN)
    head_sizes: tuple[int, ...]  # rows of a head call: up to 3 per post (fused, text alone, image alone)
    lengths: tuple[int, ...]  # tokens of a caption

    @classmethod
    @functools.cache  # asked for on every model call of a batch (Scorer.buckets): made once per (size, length)
    def for_model(cls, batch_size: int, max_length: int) -> ShapeBuckets:
        """Buckets for calls of at most `batch_size` posts whose tokenizer truncates at `max_length` tokens."""
        lengths = tuple(n for n in _doublings(MIN_LENGTH, max_length) if n < max_length) + (max_length,)
        return cls(batch_sizes=_doublings(MIN_ROWS, batch_size), head_sizes=_doublings(MIN_ROWS, 3 * batch_size),
                   lengths=lengths)

    def rows(self, n: int) -> int:
        return _bucket(self.batch_sizes, n, "rows")

    def head_rows(self, n: int) -> int:
        return _bucket(self.head_sizes, n, "head rows")

    def length(self, n: int) -> int:
        return _bucket(self.lengths, n, "tokens")

    def text_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, tokens) a text-encoder call can have."""
        return [(rows, length) for rows in self.batch_sizes for length in self.lengths]


def _bucket(sizes: tuple[int, ...], n: int, what: str) -> int:
    for size in sizes:
        if n <= size:
            return size
    raise ValueError(f"{n} {what} is more than the largest bucket, {sizes[-1]}")
