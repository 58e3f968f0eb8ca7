"""Validation on several processes, the parts one process can check: where `on_device` puts the network a
validation decodes with, and the offloaded teacher's weights pinned again after. The end-to-end checks (2 gloo
ranks write what one process writes) are tests/test_train.py::test_two_gloo_ranks_equal_one_rank_with_the_same_
global_batch (teacher: DDP, full: FSDP2) and tests/test_train_distill_fsdp.py::test_fsdp2_two_ranks_equal_one_
rank_and_export_the_same_student (distill)."""

from __future__ import annotations


def test_on_device_moves_a_network_for_the_block_and_repins_an_offloaded_teacher_after():
    import torch

    from pid.training.val_ranks import on_device

    class Recorded(torch.nn.Linear):
        def to(self, *args, **kwargs):
            events.append(torch.device(args[0]).type)
            return self

    class Offload:  # TeacherOffload's part on_device uses
        def repin(self) -> None:
            events.append("repin")

    events: list[str] = []
    net = Recorded(2, 2)
    with on_device(net, torch.device("meta")):  # a CPU copy: to the device for the block, back after
        assert events == ["meta"]
    assert events == ["meta", "cpu"]
    events.clear()
    with on_device(net, torch.device("cpu")):  # already there: nothing moves
        pass
    assert events == []
    net.offload = Offload()  # what TeacherOffload sets on the teacher
    with on_device(net, torch.device("meta")):
        pass
    assert events == ["meta", "cpu", "repin"]


def test_teacher_offload_repin_pins_every_weight_of_every_unit_again(monkeypatch):
    """After the whole teacher went to the GPU and back its CPU weights are unpinned: repin pins each one again
    (pinning needs CUDA: `pin_memory` is stood in for here)."""
    import torch

    from pid.training.distill_parallel import TeacherOffload

    from tiny import tiny_net

    teacher = tiny_net("v1pt5_latent16ch").eval().requires_grad_(False)
    offload = TeacherOffload(teacher, torch.device("cpu"))
    assert not offload.pin  # no CUDA: nothing to pin
    weights = [t for unit in offload.units for *_, t in unit.entries]
    assert len(weights) == len(list(teacher.parameters())) + len(list(teacher.buffers()))
    pinned: set[int] = set()

    def pin_memory(tensor):
        copy = tensor.clone()
        pinned.add(copy.data_ptr())
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor: tensor.data_ptr() in pinned)
    offload.pin = True
    offload.repin()
    assert all(t.is_pinned() for t in weights if t.numel())
    again = {t.data_ptr() for t in weights}
    offload.repin()  # already pinned: nothing is copied again
    assert {t.data_ptr() for t in weights} == again
