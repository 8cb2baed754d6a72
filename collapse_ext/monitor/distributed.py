"""Merging a monitor's statistics across ranks (torch.distributed): the exact ClassStats
all-reduce of every layer plus one sum of the NC4 and dropped-batch counts (and one of
the per-class NC4 tallies, when kept).
:class:`Distributed` is a part of :class:`~collapse_ext.CollapseMonitor`."""

from __future__ import annotations

import torch

from .layer import Layer, Session

__all__ = ["Distributed"]


class Distributed:
    """Rank, world size and the all-reduce of a monitor's session."""

    def _world(self) -> int:
        import torch.distributed as dist

        if not self.sync or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _rank(self) -> int:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group)
        return 0

    def _all_reduce(self, session: Session, *, stats: bool = True) -> None:
        """Exact merge of every layer's statistics (ClassStats.all_reduce) and one sum of
        the NC4 and dropped-batch counts of all layers across ranks; a rank that saw no batch
        of a layer joins with empty statistics."""
        import torch.distributed as dist

        layers = [session.layers[name] for name in self.layer_names]
        device = self._comm_device(layers)
        dims = torch.tensor([0 if s.acc is None else s.acc.dim for s in layers], dtype=torch.int64, device=device)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=self.process_group)
        for layer, dim in zip(layers, dims.tolist()):
            if dim and layer.acc is None:
                layer.allocate(int(dim), device)
        active = [layer for layer in layers if layer.acc is not None]
        if stats:
            for layer in active:
                layer.acc.all_reduce(self.process_group)
        if active:
            counts = torch.stack([torch.cat([layer.ncc, layer.dropped]).to(device) for layer in active])
            dist.all_reduce(counts, group=self.process_group)
            for layer, row in zip(active, counts):
                row = row.to(layer.acc.device)
                layer.ncc, layer.dropped = row[:3].clone(), row[3:].clone()
            by_class = [layer for layer in active if layer.class_ncc is not None]
            if by_class:
                tallies = torch.stack([layer.class_ncc.to(device) for layer in by_class])
                dist.all_reduce(tallies, group=self.process_group)
                for layer, t in zip(by_class, tallies):
                    layer.class_ncc = t.to(layer.acc.device)

    def _comm_device(self, layers: list[Layer]) -> torch.device:
        for layer in layers:
            if layer.acc is not None:
                return layer.acc.device
        import torch.distributed as dist

        backend = dist.get_backend(self.process_group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
