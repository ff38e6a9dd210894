"""What one forward step reads besides the activations: ``StepMetadata``.

Every tensor here lives in a persistent device buffer owned by ``StepMetadataBuilder`` (sliced to
the step's token count), so a CUDA graph captured over one step replays correctly after the builder
has written the next step's values into the same addresses.

Per token (``[T]``, padding tokens: position 0, request −1, every slot −1):

* ``positions`` int64 — absolute position of the token in its request;
* ``token_to_req`` int64 — row of the token's request in every block table;
* ``swa_slot_mapping`` int64 — SWA-cache slot the token's K=V record is written to.

Per compressed layer kind (``c4`` for ratio 4, ``c128`` for ratio 128; ``None`` when the model has
no layer of that kind), a ``CompressedMetadata``:

* ``slot_mapping [T]`` — compressed-cache slot of the entry the token closes (``(p+1) % r == 0``:
  entry ``p // r``), −1 for tokens that close none;
* ``state_slot_mapping [T]`` — compressor-state slot of the token's state row;
* ``block_table [R, M]`` int32 — compressed-cache pages of each request (also the indexer K cache's
  pages for ratio 4: both hold one record per compressed entry, ``block_size`` entries per page);
* ``state_block_table [R, Ms]`` int32 — compressor-state pages (a ring: see ``runtime.cache``).

The block tables are whole persistent ``[max_num_seqs, M]`` buffers (never sliced), so only the
token dimension changes between steps.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class CompressedMetadata:
    slot_mapping: torch.Tensor
    state_slot_mapping: torch.Tensor
    block_table: torch.Tensor
    state_block_table: torch.Tensor


@dataclasses.dataclass
class StepMetadata:
    positions: torch.Tensor
    token_to_req: torch.Tensor
    swa_slot_mapping: torch.Tensor
    swa_block_table: torch.Tensor
    c4: Optional[CompressedMetadata] = None
    c128: Optional[CompressedMetadata] = None
    # the runtime's CacheConfig.max_model_len: every position the builder admits is below it, so a
    # layer's RoPE table needs at least this many rows (None: the caller vouches for the positions)
    max_model_len: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def compressed(self, ratio: int) -> CompressedMetadata:
        meta = self.c4 if ratio == 4 else self.c128 if ratio == 128 else None
        if meta is None:
            raise ValueError(f"this step has no metadata for compress ratio {ratio} (the cache manager was "
                             "built without layers of that ratio)")
        return meta

    def token_tensors(self) -> list[torch.Tensor]:
        """The tensors whose first dim is the token count (what a compile marks dynamic)."""
        out = [self.positions, self.token_to_req, self.swa_slot_mapping]
        for c in (self.c4, self.c128):
            if c is not None:
                out += [c.slot_mapping, c.state_slot_mapping]
        return out
