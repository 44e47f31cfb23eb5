"""
A simulated CUDA machine for the CPU build of PyTorch, so that the CUDA branches of the scripts run
as users run them (subprocess, real command line) on machines without a GPU.

simulate(names) (sitecustomize.py calls it for SIMULATED_GPUS, a comma-separated list of device
names such as 'NVIDIA GeForce RTX 3070,Tesla T4') replaces only the lowest layer, the calls into
the CUDA runtime, so that torch's own Python code above it runs unchanged: torch.cuda.is_available,
device_count, set_device (with torch's own argument checks), current_device, get_device_name,
get_device_capability and is_bf16_supported answer as on such a machine. The first thing that needs real CUDA (a tensor moved to or made on the GPU, a CUDA
generator or random state) ends the process with exit status 97, printing where in the scripts it
happened:
    simulated GPU: first CUDA tensor at train_bio.py:123
set_device calls are printed too ('simulated GPU: set_device(1)'). Under torchrun, with SIMULATED_GPU_MEET
naming a folder, each process waits there (up to a minute) for the others to reach their first CUDA tensor
before it ends: torchrun stops the rest as soon as one process ends.
"""

import os
import sys
import time
import traceback
from types import SimpleNamespace

FIRST_TENSOR_EXIT = 97
# compute capability of the simulated GPUs (bfloat16 is native from 8.0)
CAPABILITY = {
    'NVIDIA GeForce RTX 3070': (8, 6),
    'NVIDIA GeForce RTX 2080 Ti': (7, 5),
    'Tesla T4': (7, 5),
    'Tesla V100-SXM2-16GB': (7, 0),
    'NVIDIA A100-SXM4-80GB': (8, 0),
    'NVIDIA H100 80GB HBM3': (9, 0),
}


def simulate(names):
    import torch
    import torch.cuda

    current = [0]

    def where():
        """The innermost frame in this repository's code (not torch's, not this file)."""
        for frame in reversed(traceback.extract_stack()[:-2]):
            if 'site-packages' not in frame.filename and frame.filename != __file__:
                return f'{os.path.basename(frame.filename)}:{frame.lineno}'
        return '?'

    def lazy_init():
        # torch.cuda's own queries (current_device, get_device_properties) initialise CUDA first,
        # which a real machine does without touching memory; anything else that asks for it
        # (C++ making a tensor, CUDA random states) is real CUDA work: stop there
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join('torch', 'cuda', '__init__.py')):
            return
        print(f'simulated GPU: first CUDA tensor at {where()}', file=sys.stderr, flush=True)
        sys.stdout.flush()
        meet_the_other_processes()
        os._exit(FIRST_TENSOR_EXIT)

    def meet_the_other_processes():
        folder, processes = os.environ.get('SIMULATED_GPU_MEET'), int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        if not folder or processes == 1:
            return
        open(os.path.join(folder, f"rank{os.environ['LOCAL_RANK']}"), 'w').close()
        deadline = time.monotonic() + 60
        while len(os.listdir(folder)) < processes and time.monotonic() < deadline:
            time.sleep(0.05)

    def set_device(index):
        if not 0 <= index < len(names):
            raise RuntimeError('CUDA error: invalid device ordinal')
        print(f'simulated GPU: set_device({index})', file=sys.stderr, flush=True)
        current[0] = index

    def properties(index):
        major, minor = CAPABILITY[names[index]]
        return SimpleNamespace(name=names[index], major=major, minor=minor, total_memory=8 * 2**30,
                               multi_processor_count=46)

    for name in names:
        assert name in CAPABILITY, f'simulated GPU {name!r}: add its compute capability to CAPABILITY'
    torch.cuda._is_compiled = lambda: True
    torch.cuda._device_count_nvml = lambda: len(names)
    torch._C._cuda_getDeviceCount = lambda: len(names)
    torch._C._cuda_setDevice = set_device
    torch._C._cuda_getDevice = lambda: current[0]
    torch._C._cuda_getCurrentRawStream = lambda index: lazy_init()  # torch._dynamo imports it on CUDA builds
    torch.cuda._lazy_init = lazy_init
    torch.cuda._get_device_properties = properties
    torch.cuda._check_bf16_tensor_supported = lambda device: True  # every CUDA GPU can emulate bfloat16

