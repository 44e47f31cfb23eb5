"""
Devices and precisions, in one place for every script: which device a run uses, the dtype and
autocast it trains or samples in, the GPU's peak FLOP/s for MFU, and the CUDA calls that must
name their device (synchronize, memory statistics, random states), and the bytes autograd keeps for
backward (kept_for_backward), which a CPU can count.

Functions raise ValueError with a one-line message for a setting that cannot work here; the
scripts print it as their error.

The choices, for train, sample, chat and bench (the analysis scripts stay on the CPU):
- device: 'auto' is CUDA, then MPS, then the CPU; 'cuda' means cuda:0, 'cuda:N' a given GPU;
  under torchrun each process takes cuda:LOCAL_RANK. CUDA devices always carry an index, and
  torch.cuda.synchronize, the memory statistics and the CUDA random states are asked of that
  device by name. A device that is not there is a one-line error.
- dtype: 'auto' is bfloat16 on GPUs that compute it natively (compute capability 8.0 and up:
  RTX 30xx/40xx, A100, L4, H100), float16 with a GradScaler on older ones (T4, V100, RTX 20xx,
  where PyTorch would otherwise emulate bfloat16, slowly), float32 on CPUs and MPS. Asking for
  bfloat16 on a GPU that only emulates it prints a note.
- float16 on a CPU: PyTorch autocasts float16 on CPUs and GradScaler('cpu') works, so
  --device=cpu --dtype=float16 runs the exact fp16 path of a GPU run (autocast, loss scaling,
  skipped overflow steps, the scaler's state in the checkpoint). It is usually slower than float32
  on a CPU; it is there so that the fp16 path is tested without a GPU (the tests run
  config_gpt2_bio_3070.py itself this way, shrunk) and can be tried before renting one.
- MFU: the peak bf16/fp16 tensor FLOP/s of the GPU, matched on the whole name
  torch.cuda.get_device_name reports (GPU_PEAK_FLOPS: RTX 3070, RTX 3070 Laptop GPU,
  RTX 3080/3090/4080/4090, Tesla T4, V100, A100, L4, L40, L40S, H100 PCIe, H100 NVL,
  H100 80GB HBM3 (SXM), H200). Another GPU shows 'mfu n/a' and a note to pass its peak, e.g.
  --peak_flops=82.6e12; CPUs have none.
"""

import sys
from contextlib import contextmanager, nullcontext

import torch

DTYPES = ('float32', 'bfloat16', 'float16')

# Dense bf16/fp16 tensor-core FLOP/s with fp32 accumulation (no sparsity), from the vendors' data
# sheets, keyed by the name torch.cuda.get_device_name reports without its 'NVIDIA ' and 'GeForce '.
# Names are matched whole: 'L4' is not 'L40S', and a GPU missing here gets 'mfu n/a'.
GPU_PEAK_FLOPS = {
    'RTX 3070': 40.6e12,
    'RTX 3070 Laptop GPU': 33.2e12,  # 40 SMs at the top boost clock, 1620 MHz; lower-power laptops clock lower
    'RTX 3080': 59.5e12,
    'RTX 3090': 71.0e12,
    'RTX 4080': 97.5e12,
    'RTX 4090': 165.2e12,
    'Tesla T4': 65.0e12,
    'Tesla V100-SXM2-16GB': 125.0e12,
    'Tesla V100-SXM2-32GB': 125.0e12,
    'Tesla V100-PCIE-16GB': 112.0e12,
    'Tesla V100-PCIE-32GB': 112.0e12,
    'A100-SXM4-40GB': 312.0e12,
    'A100-SXM4-80GB': 312.0e12,
    'A100-PCIE-40GB': 312.0e12,
    'A100 80GB PCIe': 312.0e12,
    'L4': 121.0e12,
    'L40': 181.0e12,
    'L40S': 362.0e12,
    'H100 PCIe': 756.0e12,
    'H100 NVL': 835.0e12,
    'H100 80GB HBM3': 989.0e12,  # the SXM part
    'H200': 989.0e12,
}


def pick_device(name='auto', local_rank=None):
    """The torch.device a setting names, made current; CUDA devices always carry an index.

    'auto' is CUDA, then MPS, then the CPU, whichever is there first. Under torchrun (local_rank
    given) 'auto' and 'cuda' are cuda:LOCAL_RANK, one GPU per process.
    """
    if name == 'auto':
        if torch.cuda.is_available():
            name = 'cuda'
        elif torch.backends.mps.is_available():
            name = 'mps'
        else:
            name = 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'") from None
    if device.type == 'cpu':
        return torch.device('cpu')
    if device.type == 'mps':
        if not torch.backends.mps.is_available():
            raise ValueError('device=mps but MPS is not available here (use --device=cpu)')
        return device
    if device.type != 'cuda':
        raise ValueError(f"device={name!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    if not torch.cuda.is_available():
        raise ValueError(f'device={name} but CUDA is not available (torch {torch.__version__}); use --device=cpu')
    if local_rank is not None:
        if device.index is not None and device.index != local_rank:
            raise ValueError(f'device={name}: under torchrun each process uses cuda:LOCAL_RANK; use --device=cuda')
        device = torch.device('cuda', local_rank)
    elif device.index is None:
        device = torch.device('cuda', 0)
    if device.index >= torch.cuda.device_count():
        raise ValueError(f'device={device} but this machine shows {torch.cuda.device_count()} CUDA device(s)')
    torch.cuda.set_device(device)  # so that work without an explicit device lands on this GPU too
    # TF32 tensor cores for float32 matmuls and convolutions (Ampere and newer), as autocast does elsewhere
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


def describe(device):
    """The device for a startup line: 'cuda:0 (NVIDIA GeForce RTX 3070)', 'cpu (8 threads)'."""
    if device.type == 'cuda':
        return f'{device} ({torch.cuda.get_device_name(device)})'
    if device.type == 'cpu':
        return f'cpu ({torch.get_num_threads()} threads)'
    return str(device)


def pick_dtype(device, dtype='auto'):
    """'float32', 'bfloat16' or 'float16' for a dtype setting on this device.

    'auto' is bfloat16 on GPUs that compute it natively (NVIDIA compute capability 8.0 and newer,
    ROCm), float16 with a GradScaler on older GPUs (T4, V100, RTX 20xx, where bfloat16 is only
    emulated and slow), and float32 elsewhere. float16 works on a CPU too (autocast, GradScaler),
    slowly unless the CPU has fp16 units: it is there to rehearse and test the GPU path.
    """
    if dtype == 'auto':
        if device.type == 'cuda':
            return 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
        return 'float32'
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of 'auto', 'float32', 'bfloat16', 'float16'")
    if dtype == 'bfloat16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported(including_emulation=False):
        print(f'note: {describe(device)} has no native bfloat16, so it is emulated and slow; '
              '--dtype=float16 (or auto) is faster', file=sys.stderr)
    return dtype


def autocast(device, dtype):
    """The context that runs a model's forward in dtype (nothing to do for float32)."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def grad_scaler(device, dtype):
    """A GradScaler, live for float16 (whose gradients would underflow unscaled), a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == 'float16')


def peak_flops(device, override=0.0):
    """(peak FLOP/s for MFU or None, a note when a GPU's peak is unknown or None)."""
    if override:
        return override, None
    if device.type != 'cuda':
        return None, None
    name = torch.cuda.get_device_name(device)
    key = name.strip().removeprefix('NVIDIA ').removeprefix('GeForce ')
    if key in GPU_PEAK_FLOPS:
        return GPU_PEAK_FLOPS[key], None
    return None, (f"note: no peak FLOP/s on record for '{name}', so MFU shows n/a; pass its dense "
                  'bf16/fp16 tensor FLOP/s, e.g. --peak_flops=40.6e12 for an RTX 3070')


def synchronize(device):
    """Wait for the device's queued work (timing); the CPU has none."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def reset_peak_memory(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(bytes allocated at the peak since the last reset, the device's total) on CUDA; None elsewhere."""
    if device.type != 'cuda':
        return None
    return torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory


@contextmanager
def kept_for_backward(exclude=()):
    """Yields a dict that holds under 'bytes', once the block ends, what autograd kept for backward inside it,
    each storage once, those of the tensors exclude (a model's weights, held anyway) left out: memory a CPU can
    measure, which on a GPU is most of a training step's peak."""
    storages, kept = {}, {}
    held = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept
    kept['bytes'] = sum(storages.values())


def saved_bytes(fn):
    """Bytes autograd keeps for backward while fn runs, each storage once."""
    with kept_for_backward() as kept:
        fn()
    return kept['bytes']


def rng_state(device):
    """The device's own random state (dropout on a GPU draws from it), or None where the CPU's serves."""
    return torch.cuda.get_rng_state(device) if device.type == 'cuda' else None


def set_rng_state(state, device):
    if device.type == 'cuda' and state is not None:
        torch.cuda.set_rng_state(state.cpu(), device)
