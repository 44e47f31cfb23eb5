"""
Simulated hardware, services and faults for the tests, imported by Python at startup when this
folder is on PYTHONPATH (tests/conftest.py: simulated_env). Each part is switched on by a variable:
  SIMULATED_GPUS       a CUDA machine with these GPUs, comma-separated names (simulated_gpu.py)
  SIMULATED_HUB        the HuggingFace hub that this JSON file describes (simulated_hub.py)
  SIMULATED_HUB_UPLOADS  uploads to the hub land in this folder instead (simulated_hub.py)
  SIMULATED_OOM_AFTER  out of memory after this many losses (simulated_faults.py)
  SIMULATED_NAN_LOSSES these losses, comma-separated call numbers, are NaN (simulated_faults.py)
  SIMULATED_HELD_OPEN   NAME:N, the first N renames onto a file NAME are refused (simulated_faults.py)
  SIMULATED_COMPILE_UNSUPPORTED  torch.compile raises, as on a Python it does not support (simulated_faults.py)
  SIMULATED_FAULT_RANK the faults happen only in the torchrun process of this RANK
  SIMULATED_MISSING    these packages, comma-separated module names, are not installed
"""
import os
import sys

faulty = os.environ.get('SIMULATED_FAULT_RANK', os.environ.get('RANK', '0')) == os.environ.get('RANK', '0')

if os.environ.get('SIMULATED_GPUS'):
    import simulated_gpu
    simulated_gpu.simulate(os.environ['SIMULATED_GPUS'].split(','))
if os.environ.get('SIMULATED_HUB'):
    import simulated_hub
    simulated_hub.simulate(os.environ['SIMULATED_HUB'])
if os.environ.get('SIMULATED_HUB_UPLOADS'):
    import simulated_hub
    simulated_hub.simulate_uploads(os.environ['SIMULATED_HUB_UPLOADS'])
if faulty and os.environ.get('SIMULATED_OOM_AFTER'):
    import simulated_faults
    simulated_faults.out_of_memory_after(int(os.environ['SIMULATED_OOM_AFTER']))
if faulty and os.environ.get('SIMULATED_NAN_LOSSES'):
    import simulated_faults
    simulated_faults.nan_losses({int(n) for n in os.environ['SIMULATED_NAN_LOSSES'].split(',')})
if faulty and os.environ.get('SIMULATED_HELD_OPEN'):
    import simulated_faults
    name, refusals = os.environ['SIMULATED_HELD_OPEN'].split(':')
    simulated_faults.held_open(name, int(refusals))
if faulty and os.environ.get('SIMULATED_COMPILE_UNSUPPORTED'):
    import simulated_faults
    simulated_faults.compile_unsupported()
for module in filter(None, os.environ.get('SIMULATED_MISSING', '').split(',')):
    sys.modules[module] = None  # how Python marks a module that cannot be imported: ModuleNotFoundError
