"""
Faults that a long run meets, made to happen on cue in a training process. The first two replace
the loss function (torch.nn.functional.cross_entropy, which the model calls) with one that
misbehaves at given calls, counted from 1 over the whole process (evaluations included).

out_of_memory_after(n): every call after the n-th raises torch.OutOfMemoryError, as a GPU that runs
    out of memory in the middle of a run.
nan_losses(calls): those calls return NaN, as a batch that drives float16 or a bad kernel to
    non-finite values; its gradients are NaN too.
compile_unsupported(): torch.compile itself raises RuntimeError, as it does where Dynamo does not
    support the Python version (3.14 with torch < 2.10, 3.13 with torch 2.5).
held_open(name, refusals): the first renames onto a file of that name are refused with Windows'
    PermissionError, as while another program (an editor, a sync client) holds it open.
"""
import os

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


def compile_unsupported():
    def unsupported(*args, **kwargs):
        raise RuntimeError('Dynamo is not supported on Python 3.14+')
    torch.compile = unsupported


def held_open(name, refusals):
    replace, left = os.replace, [refusals]

    def refusing(src, dst):
        if os.path.basename(dst) == name and left[0]:
            left[0] -= 1
            raise PermissionError(13, 'The process cannot access the file because it is being used by another process')
        replace(src, dst)
    os.replace = refusing
