"""``torchrun`` support of :func:`~collapse_ext.analyze.analyze`: the rank and world
size (initialising the process group when the environment asks for it), one error
raised alike on every rank, and sums across ranks."""

from __future__ import annotations

import os

import torch


def _world() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        return -1, int(os.environ["WORLD_SIZE"]), True
    return 0, 1, False


def _agree(error: BaseException | None, world: int) -> None:
    """Every rank raises the same error (the one at the smallest row), or none does."""
    if world == 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    mine = None if error is None else (getattr(error, "row", -1), type(error).__name__, str(error))
    seen: list = [None] * world
    dist.all_gather_object(seen, mine)
    errors = sorted(e for e in seen if e is not None)
    if errors:
        _, kind, message = errors[0]
        raise (TypeError if kind == "TypeError" else ValueError)(message)


def _sum(t: torch.Tensor, world: int, comm: torch.device) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        moved = t.to(comm)
        dist.all_reduce(moved)
        return moved.to(t.device)
    return t


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend()
