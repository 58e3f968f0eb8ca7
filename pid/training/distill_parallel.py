"""Where a distillation run's four networks live: FSDP2 shards the three trained ones across ranks, and the frozen
teacher can stay on the CPU between its uses (`teacher_offload=true`).

FSDP2 (`shard_distill_step`): student and fake score are sharded per transformer block and per network root, the
discriminator as one unit, `DistillStep` as the root, as mode=full shards its network. 0-d parameters (the gates'
log_alpha) cannot be sharded: they stay replicated and a hook averages their gradients over ranks, as DDP would.

The teacher is not sharded: it is replicated in bf16 (CUDA) or offloaded. Sharding it would save (N-1)/N of its
2.6 GiB (bf16, flux) but all-gather every block on each of its 2-3 calls per iteration and again in the GAN
term's backward through its first blocks; the offload saves nearly all of it without touching the other ranks.

Offload (`TeacherOffload`): the teacher's tensors stay on the CPU (pinned on CUDA). A forward pre-hook copies a
block's weights to the device just before the block runs, a forward hook puts the CPU tensors back right after;
the rest of the network (embedders, adapter, final layer) is copied for the whole call. The device copies are new
tensors, so what autograd saved stays valid. Without activation checkpointing autograd would keep every weight a
grad-mode call used (the GAN term backpropagates through the teacher, and the VSD call's graph lives until the
student phase's losses are built) on the device: a saved-tensor hook stores such a weight as its CPU tensor and
copies it back when the backward pass needs it. With activation checkpointing autograd saves no weights (the
checkpoint's own hooks apply) and a block recomputed in the backward pass runs the copy hooks again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pid.training.parallel import average_replicated_gradients


def shard_distill_step(step: nn.Module) -> nn.Module:
    """FSDP2 over every rank of the process group: blocks, then each trained network, then the step (the root).
    `step` is a `pid.training.distill_loop.DistillStep`; its teacher is not registered and stays as it is."""
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in step.parameters() if p.ndim == 0}
    average_replicated_gradients(scalars)  # built with requires_grad on every trained network's trainables
    for net in (step.student, step.fake_score):
        for block in [*net.patch_blocks, *net.pixel_blocks]:
            fully_shard(block, ignored_params=scalars)
        fully_shard(net, ignored_params=scalars)
    fully_shard(step.discriminator, ignored_params=scalars)
    return fully_shard(step, ignored_params=scalars)


# ------------------------------------------------------------------------------------------------------------
# Teacher offload


@dataclass
class _Unit:
    """The tensors one hook pair moves: (owning module, attribute name, is a parameter, the CPU tensor)."""

    entries: list[tuple[nn.Module, str, bool, Tensor]] = field(default_factory=list)


class TeacherOffload:
    """Keep `teacher`'s weights on the CPU; copy each block to `device` only while it runs (see the module doc).

    On a CPU run the copies are the CPU tensors themselves: the same code path, no memory saved. `loads` counts
    the units moved and `packed` the weights autograd saved as CPU tensors, for tests and logs."""

    def __init__(self, teacher: nn.Module, device: torch.device, checkpointed: bool = False) -> None:
        self.device = device
        self.loads = 0
        self.packed = 0
        self.checkpointed = checkpointed
        self._saved: dict[int, tuple[Tensor, int]] = {}  # device copy's storage -> (CPU tensor, copy's offset)
        self._contexts: list[torch.autograd.graph.saved_tensors_hooks] = []
        blocks = [*teacher.patch_blocks, *teacher.pixel_blocks]
        in_blocks = {id(m) for block in blocks for m in block.modules()}
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        teacher.to("cpu")
        root = _collect([m for m in teacher.modules() if id(m) not in in_blocks], self.pin)
        self.units = [root, *(_collect(list(block.modules()), self.pin) for block in blocks)]
        self._hook(teacher, root)
        for block, unit in zip(blocks, self.units[1:]):
            self._hook(block, unit)

    def repin(self) -> None:
        """Pin the CPU weights again after the whole teacher went to the device and back (`Module.to`
        allocates new, unpinned CPU tensors; unpinned host-to-device copies are synchronous)."""
        if not self.pin:
            return
        for unit in self.units:
            for _module, _name, _is_param, tensor in unit.entries:
                if not tensor.is_pinned():
                    tensor.data = tensor.data.pin_memory()

    def _hook(self, module: nn.Module, unit: _Unit) -> None:
        module.register_forward_pre_hook(lambda _m, _args: self._load(unit))
        module.register_forward_hook(lambda _m, _args, _out: self._unload(unit), always_call=True)

    def _load(self, unit: _Unit) -> None:
        self.loads += 1
        for module, name, is_param, cpu in unit.entries:
            moved = cpu.to(self.device, non_blocking=True)
            if is_param:
                moved = nn.Parameter(moved, requires_grad=False)
                module._parameters[name] = moved
            else:
                module._buffers[name] = moved
            if moved.numel():
                self._saved[_storage(moved)] = (cpu, moved.storage_offset())
        if not self.checkpointed:
            context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            context.__enter__()
            self._contexts.append(context)

    def _unload(self, unit: _Unit) -> None:
        if not self.checkpointed:
            self._contexts.pop().__exit__(None, None, None)
        for module, name, is_param, cpu in unit.entries:
            table = module._parameters if is_param else module._buffers
            if table[name].numel():
                self._saved.pop(_storage(table[name]), None)
            table[name] = cpu

    def _pack(self, tensor: Tensor) -> Tensor | tuple:
        """A weight (or a view of one, e.g. the transpose a matmul saves) is kept as its CPU tensor and layout."""
        found = self._saved.get(_storage(tensor)) if tensor.numel() else None
        if found is None:
            return tensor
        self.packed += 1
        cpu, base_offset = found
        return cpu, tuple(tensor.shape), tensor.stride(), tensor.storage_offset() - base_offset

    def _unpack(self, packed: Tensor | tuple) -> Tensor:
        if not isinstance(packed, tuple):
            return packed
        cpu, shape, stride, offset = packed
        copy = cpu.to(self.device, non_blocking=True)
        return copy.as_strided(shape, stride, copy.storage_offset() + offset)


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _collect(modules: list[nn.Module], pin: bool) -> _Unit:
    """The modules' own parameters and buffers (pinned for fast, asynchronous host-to-device copies on CUDA)."""
    unit = _Unit()
    for module in modules:
        for kind, table in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if pin:
                    tensor.data = tensor.data.pin_memory()
                unit.entries.append((module, name, kind, tensor))
    return unit


__all__ = ["TeacherOffload", "average_replicated_gradients", "shard_distill_step"]
