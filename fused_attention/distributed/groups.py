"""Which process group a context-parallel call runs on: a ``ProcessGroup``, a 1-D ``DeviceMesh`` or None."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import AttentionArgumentError, AttentionTypeError


def resolve_group(group: Any) -> dist.ProcessGroup:
    """The ``ProcessGroup`` behind ``group``: None is the default (world) group; a ``DeviceMesh`` must be
    1-D (its one dimension is the sequence-parallel group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise AttentionArgumentError(
            "group: torch.distributed is not initialized; call torch.distributed.init_process_group first"
        )
    if group is None:
        return dist.group.WORLD
    # What dist.new_group returns on the ranks it leaves out: an int sentinel, not a group.
    if group is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
        raise AttentionArgumentError(
            "group: this rank is not a member of the group (dist.new_group returned NON_GROUP_MEMBER here); "
            "call only on the group's ranks"
        )
    if isinstance(group, dist.ProcessGroup):
        return group
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without device meshes
        DeviceMesh = ()
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise AttentionArgumentError(
                f"group: a DeviceMesh must be 1-D (the sequence-parallel dimension), got {group.ndim}-D; "
                "pass mesh['<dim name>']"
            )
        return group.get_group()
    raise AttentionTypeError(f"group must be a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")


def comm_device(group: dist.ProcessGroup) -> torch.device:
    """Where small bookkeeping tensors of a collective must live: CUDA for NCCL, else the CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
