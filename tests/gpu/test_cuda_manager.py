"""The manager on CUDA tensors (needs a CUDA device): ranks are processes on the same GPU(s), joined
by gloo as in the CPU tests; each rank uses device ``rank % device_count``.

Checks what CPU runs cannot: async saves with replication while the training thread keeps the
device busy, no device synchronization from tasd while training steps poll the queue, no CUDA
context created by tasd's background thread on another device, and tensors restored onto the
device they were saved from.
"""

from __future__ import annotations

import torch

from tasd import BasicTensorAwareStateDict, device
from tasd.managers import LocalCheckpointManager
from tasd.managers.async_ckpt import AsyncCallsQueue
from tasd.managers.replication import RingReplicationStrategy


def gpu_state(dev: torch.device, rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(rank * 1000 + step)
    return {"w": torch.randn(1024, 1024, generator=g).to(dev), "b": torch.randn(4096, generator=g).to(dev),
            "step": step, "cpu": torch.full((8,), float(step))}


def async_saves_while_training(rank, world, root):
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    m = LocalCheckpointManager(root, "gpu", RingReplicationStrategy(1, 2))
    queue = AsyncCallsQueue(persistent=True)
    x = torch.randn(2048, 2048, device=dev)
    syncs_in_polls = 0
    for step in range(1, 4):
        sd = gpu_state(dev, rank, step)
        queue.schedule_async_request(m.save(BasicTensorAwareStateDict(sd), step, is_async=True))
        for _ in range(20):  # training steps: device work and a poll of the queue each
            x = torch.tanh(x @ x) / 2048
            before = device.sync_count()
            queue.maybe_finalize_async_calls(blocking=False)
            syncs_in_polls += device.sync_count() - before
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    loaded, _ = LocalCheckpointManager(root, "gpu", RingReplicationStrategy(1, 2)).load()
    loaded.restore_tensor_device()
    expected = gpu_state(dev, rank, 3)
    on_device = all(loaded.state_dict[k].device == dev for k in ("w", "b"))
    equal = all(torch.equal(loaded.state_dict[k].cpu(), expected[k].cpu()) for k in ("w", "b", "cpu"))
    others = [i for i in range(torch.cuda.device_count()) if i != dev.index]
    # A CUDA context on a device this rank does not use shows up as memory reserved there.
    foreign = sum(torch.cuda.memory_reserved(i) for i in others)
    return syncs_in_polls, on_device, equal, loaded.state_dict["cpu"].device.type, foreign


def test_async_replicated_saves_on_cuda(ranks, tmp_path):
    for syncs, on_device, equal, cpu_dev, foreign in ranks(async_saves_while_training, 2, tmp_path, timeout_s=300):
        assert syncs == 0, "polling the queue must not wait for the device"
        assert on_device and equal and cpu_dev == "cpu"
        assert foreign == 0
