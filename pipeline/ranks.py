"""What the training loop and the launcher share about ranks, with no project imports beyond core: the
signals a rank raises (RankDone, RankOOM) and the pure batch rules (the first batch, the batch after an
out-of-memory error). pipeline/training.py raises the signals; pipeline/launch.py and pipeline/train_worker.py
act on them, so neither training nor launch imports the other.
"""
from __future__ import annotations

import math

from pipeline.core import StageFailed


class RankDone(Exception):
    """Raised on ranks > 0 once training is over; pipeline.train_worker catches it and exits 0."""


class RankOOM(Exception):
    """Raised on the rank that ran out of memory under DDP: it cannot retry alone (the other ranks would wait
    in their next collective until the NCCL timeout), so it exits, torchrun ends the group, and the parent
    relaunches every rank with half the batch. pipeline.train_worker writes `info` to oom.json beside the
    result."""

    def __init__(self, info: dict):
        super().__init__(f"out of memory at step {info.get('step')}")
        self.info = info


def first_batch(kind: str, batch: int, grad_acc: int, floor: int) -> tuple[int, int, str | None]:
    """The per-device batch a stage can start with: raised to the trainer's minimum (`floor`, the method's
    min_batch), the effective batch kept."""
    if batch >= floor:
        return batch, grad_acc, None
    new_acc = max(1, math.ceil(batch * grad_acc / floor))
    return floor, new_acc, (f"{kind}: per-device batch {batch} raised to {floor} (TRL's {kind.upper()} "
                            f"trainer needs >= {floor}), accumulation {grad_acc} -> {new_acc} to keep the "
                            "effective batch")


def halved_after_oom(batch: int, grad_acc: int, retries: int, where: str, floor: int,
                     max_retries: int) -> tuple[int, int]:
    """The batch to retry with after an out-of-memory error: half the per-device batch, twice the
    accumulation; StageFailed below the trainer's minimum batch (`floor`) or after `max_retries`. In process
    (training.fit) and for DDP (launch)."""
    if batch // 2 < floor or retries >= max_retries:
        raise StageFailed(f"CUDA out of memory {where} with per-device batch {batch} (after {retries} "
                          "retries): shorten max_length, turn on QLoRA (QLORA=true), or use a bigger GPU", code="oom")
    return batch // 2, grad_acc * 2
