r"""Row-sharded weights (FSDP2's DTensor parameters, ``Shard(0)`` on a 1-D mesh, or HSDP's
``(Replicate(), Shard(0))`` on a 2-D replicate x shard mesh) in the optimizers.

Every rank holds rows [o, o + m_local) of a weight :math:`W \in \mathbb{R}^{m\times n}` and of its
gradient. The update equals the one on the full matrix, with as little communication as the
projection side allows:

- right projection (:math:`R = G P^\top`, m x r): row-local. The moments and APOLLO's channel factors
  stay with the rows; only sums of squares (tensor-wise norms, the limiter's norm) are all-reduced,
  a few scalars per weight.
- left projection (:math:`R = P^\top G`, r x n): :math:`R = \sum_\text{ranks} P_{[o:o+m_\text{local}]}^\top G_\text{local}`,
  one all-reduce of r n numbers; the moments are then replicated and the back-projection of each
  rank uses its own rows of P.
- every rank draws the same random P from the same seed; an SVD P needs the full gradient, gathered
  once per refresh, and is broadcast from the group's first rank so that all ranks agree to the bit.

Optimizer state follows the weight: row-local moments are ``Shard(0)`` DTensors, replicated ones
``Replicate()`` DTensors, so that ``torch.distributed.checkpoint`` saves each piece once.

HSDP (a 2-D mesh): each replica group holds the whole weight, sharded over its shard dimension, and
FSDP2 has already averaged the gradient over the replicas. The sums above therefore run over the
shard dimension only (``RowShard.group``): summing over the replicas too would add identical copies.
Every replica computes the same update from the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

try:  # DTensor exists wherever torch.distributed does; a torch built without it has no sharded weights
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None


@dataclass(frozen=True)
class RowShard:
    """Rows [offset, offset + rows) of a weight of global shape `shape`, on `mesh` (1-D, or 2-D with the rows
    sharded over its last dimension and replicated over the first), laid out as `placements`."""

    mesh: object
    offset: int
    rows: int
    shape: tuple[int, ...]
    placements: tuple = ()

    @property
    def group(self):
        """The ranks that hold the other rows of this replica: the mesh's last (shard) dimension."""
        return self.mesh.get_group(self.mesh.ndim - 1)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks of the shard dimension in place."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The group's first rank's `tensor` on every rank, in place."""
        dist.broadcast(tensor, group=self.group, group_src=0)
        return tensor

    def rows_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor that spans all m rows."""
        return full[self.offset:self.offset + self.rows]


def is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard; any other tensor itself)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def row_shard(param: torch.Tensor) -> RowShard | None:
    """Where `param`'s rows sit, for a DTensor sharded on dim 0 (FSDP2's ``(Shard(0),)``, HSDP's
    ``(Replicate(), Shard(0))``); None for a whole tensor.

    A replicated DTensor is whole on every rank (None); other layouts are refused with a ValueError.
    """
    if not is_dtensor(param):
        return None
    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim > 2:
        raise ValueError(f"apollo optimizers take DTensor parameters on a 1-D or 2-D (HSDP) device mesh, got a "
                         f"{mesh.ndim}-D mesh")
    if all(p == Replicate() for p in placements):
        return None
    if placements != (Replicate(),) * (mesh.ndim - 1) + (Shard(0),):
        raise ValueError(f"apollo optimizers take DTensor parameters sharded on dim 0 (FSDP2, or HSDP's replicate x "
                         f"shard), got {placements}")
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    return RowShard(mesh=mesh, offset=offset[0], rows=local_shape[0], shape=tuple(param.shape), placements=placements)


def zeros_like_layout(param: torch.Tensor, shape: tuple[int, ...], *, rows_sharded: bool, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """Zero state of global `shape` laid out like `param`: a DTensor (``Shard(0)`` when the state's rows
    are the weight's rows, ``Replicate()`` otherwise) for a DTensor `param`, a plain tensor otherwise."""
    if not is_dtensor(param):
        return torch.zeros(shape, dtype=dtype, device=device)
    mesh = param.device_mesh
    shard = row_shard(param)
    if rows_sharded and shard is not None:
        local_shape = (shard.rows, *shape[1:])
        placements = shard.placements
    else:
        local_shape, placements = tuple(shape), (Replicate(),) * mesh.ndim
    local_zeros = torch.zeros(local_shape, dtype=dtype, device=device)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_zeros, mesh, placements, shape=torch.Size(shape), stride=stride)
