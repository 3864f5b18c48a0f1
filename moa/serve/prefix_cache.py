"""Prefix caching keyed by routing: a prompt's leading blocks are not prefilled again.

Chat requests repeat long prefixes (a chat template's system prompt is about half of a short
request's tokens). As vLLM's automatic prefix caching does, the keys/values of every full
block of ``block_size`` prompt tokens are kept after a prefill, keyed by a hash chain over the
blocks (a block's key covers every token before it); a new prompt takes the longest chain of
cached blocks (leaving at least its last token to compute, whose logits give its first token)
and prefills only the rest, attending to the cached blocks as a later chunk of a chunked
prefill does (:mod:`moa.serve.mixed_step`).

moa's twist: keys/values depend on the adapters. A block's key also holds its request's
routing (the mixture and the layer its adapters start at), so a prefix is reused only under
the same decision. Below the adapters' first layer the keys/values of every routing are the
base's, but reusing them alone would save nothing: the layers above still need the whole
prefix's hidden states, which a forward can only get by running the layers below.

Adapters change under a name (a reload) without the name changing, so the engine clears the
cache whenever the model's adapters change (:meth:`PrefixCache.clear`). Blocks are evicted
least recently used beyond ``capacity_bytes``.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from moa.serve.packing import RowKV

#: Prompt tokens per cached block (vLLM's default block size).
BLOCK_SIZE = 16


def routing_key(mixture: dict[str, float] | None, from_layer: int) -> bytes:
    """The routing part of a block's key: the mixture (sorted) and the adapters' first layer."""
    items = sorted((mixture or {}).items())
    return repr((items, int(from_layer))).encode()


class PrefixCache:
    """Full prompt blocks' keys/values, by hash chain and routing, evicted LRU.

    Args:
        capacity_bytes: Keys/values kept at most.
        block_size: Tokens per block.
    """

    def __init__(self, capacity_bytes: int, block_size: int = BLOCK_SIZE):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {block_size}.")
        self.capacity_bytes = int(capacity_bytes)
        self.block_size = int(block_size)
        self._blocks: collections.OrderedDict[bytes, tuple[RowKV, int]] = collections.OrderedDict()
        self.bytes = 0
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, tokens: Sequence[int], routing: bytes, blocks: int) -> list[bytes]:
        keys, parent = [], hashlib.sha256(routing).digest()
        for b in range(blocks):
            block = tokens[b * self.block_size: (b + 1) * self.block_size]
            parent = hashlib.sha256(parent + b"".join(int(t).to_bytes(8, "little", signed=True) for t in block)).digest()
            keys.append(parent)
        return keys

    def lookup(self, tokens: Sequence[int], routing: bytes) -> tuple[int, RowKV | None]:
        """The longest cached prefix of ``tokens`` under ``routing``, in whole blocks, shorter than
        ``tokens``: ``(its length, its per-layer keys/values)``, or ``(0, None)``."""
        self.queries += len(tokens)
        found: list[RowKV] = []
        for key in self._keys(tokens, routing, (len(tokens) - 1) // self.block_size):
            entry = self._blocks.get(key)
            if entry is None:
                break
            self._blocks.move_to_end(key)
            found.append(entry[0])
        if not found:
            return 0, None
        length = len(found) * self.block_size
        self.hits += length
        layers = [(torch.cat([block[i][0] for block in found], dim=-2), torch.cat([block[i][1] for block in found], dim=-2))
                  for i in range(len(found[0]))]
        return length, layers

    def insert(self, tokens: Sequence[int], routing: bytes, kv: RowKV) -> None:
        """Keep the full blocks of a prefilled prompt (``kv``: its per-layer keys/values, batch 1)."""
        if self.capacity_bytes <= 0:
            return
        size = self.block_size
        for b, key in enumerate(self._keys(tokens, routing, len(tokens) // size)):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            block = [(k[..., b * size: (b + 1) * size, :].clone(), v[..., b * size: (b + 1) * size, :].clone())
                     for k, v in kv]
            nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in block)
            self._blocks[key] = (block, nbytes)
            self.bytes += nbytes
        while self.bytes > self.capacity_bytes and self._blocks:
            _, (_, nbytes) = self._blocks.popitem(last=False)
            self.bytes -= nbytes

    def clear(self) -> None:
        """Forget every block (the adapters changed)."""
        self._blocks.clear()
        self.bytes = 0

    def stats(self) -> dict[str, Any]:
        """Blocks and bytes held, prompt tokens looked up and found."""
        return {"prefix_cache_blocks": len(self._blocks), "prefix_cache_bytes": self.bytes,
                "prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits}
