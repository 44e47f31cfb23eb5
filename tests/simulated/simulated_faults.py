"""
Faults that a long run meets, made to happen on cue in a training process: each replaces the loss
function (torch.nn.functional.cross_entropy, which the model calls) with one that misbehaves at
given calls, counted from 1 over the whole process (evaluations included).

out_of_memory_after(n): every call after the n-th raises torch.OutOfMemoryError, as a GPU that runs
    out of memory in the middle of a run.
nan_losses(calls): those calls return NaN, as a batch that drives float16 or a bad kernel to
    non-finite values; its gradients are NaN too.
"""
import torch
import torch.nn.functional as F


def wrap_loss(misbehave):
    cross_entropy, seen = F.cross_entropy, [0]

    def loss(*args, **kwargs):
        seen[0] += 1
        return misbehave(seen[0], cross_entropy(*args, **kwargs))

    F.cross_entropy = loss


def out_of_memory_after(calls):
    def fail(call, value):
        if call > calls:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB (simulated)')
        return value
    wrap_loss(fail)


def nan_losses(calls):
    wrap_loss(lambda call, value: value * float('nan') if call in calls else value)
