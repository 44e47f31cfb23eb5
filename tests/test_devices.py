"""
Device setup: devices.py's logic, and every script run on a simulated CUDA machine (tests/simulated)
as users run it, up to the first tensor moved to the GPU (where the CPU build of PyTorch must stop).

    python -m pytest tests/test_devices.py              (-m "not slow": the quick ones only)
"""

import re
import subprocess
import sys

import pytest
import torch

import devices
from conftest import TINY, message_lines, run_script, simulated_env
from checkpoints import save_checkpoint
from model_bio import GPT, GPTConfig

RTX_3070 = 'NVIDIA GeForce RTX 3070'
FIRST_TENSOR = re.compile(r'simulated GPU: first CUDA tensor at (\S+):(\d+)')


def first_cuda_tensor(proc, workdir):
    """The source line where a run on the simulated GPU made its first CUDA tensor."""
    assert proc.returncode == 97, proc.stdout + proc.stderr  # 97: stopped there, not by an error before
    file, line = FIRST_TENSOR.search(proc.stderr).groups()
    return (workdir / file).read_text().splitlines()[int(line) - 1].strip()


@pytest.mark.parametrize('name, peak', [
    ('NVIDIA GeForce RTX 3070', 40.6e12),
    ('NVIDIA GeForce RTX 3070 Laptop GPU', 33.2e12),
    ('NVIDIA GeForce RTX 4090', 165.2e12),
    ('NVIDIA L4', 121e12),
    ('NVIDIA L40S', 362e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H100 NVL', 835e12),
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('Tesla T4', 65e12),
    ('NVIDIA GeForce RTX 4060 Ti', None),  # not in the table: no guess from a similar name
    ('NVIDIA L40', 181e12),
])
def test_peak_flops_match_whole_device_names(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    found, note = devices.peak_flops(torch.device('cuda', 0))
    assert found == peak
    assert (note is None) == (peak is not None)
    if note:
        assert name in note and '--peak_flops=' in note
    assert devices.peak_flops(torch.device('cuda', 0), override=1e12) == (1e12, None)
    assert devices.peak_flops(torch.device('cpu')) == (None, None)


def test_cuda_calls_name_their_device(monkeypatch):
    calls = []
    for function in ('synchronize', 'reset_peak_memory_stats', 'max_memory_allocated', 'get_rng_state'):
        monkeypatch.setattr(torch.cuda, function, lambda device, function=function: calls.append((function, device)) or 0)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: calls.append(('set_rng_state', device)))
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device: calls.append(('properties', device))
                        or type('Properties', (), {'total_memory': 8})())
    gpu = torch.device('cuda', 1)
    devices.synchronize(gpu)
    devices.reset_peak_memory(gpu)
    assert devices.peak_memory(gpu) == (0, 8)
    devices.rng_state(gpu)
    devices.set_rng_state(torch.zeros(4, dtype=torch.uint8), gpu)
    assert calls == [('synchronize', gpu), ('reset_peak_memory_stats', gpu), ('max_memory_allocated', gpu),
                     ('properties', gpu), ('get_rng_state', gpu), ('set_rng_state', gpu)]
    calls.clear()
    cpu = torch.device('cpu')
    devices.synchronize(cpu)
    devices.reset_peak_memory(cpu)
    assert devices.peak_memory(cpu) is None and devices.rng_state(cpu) is None
    devices.set_rng_state(None, cpu)
    assert calls == []


@pytest.mark.parametrize('native, expected', [(True, 'bfloat16'), (False, 'float16')])
def test_auto_dtype_is_bfloat16_only_where_the_gpu_has_it(monkeypatch, native, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True:
                        asked.append(including_emulation) or native or including_emulation)
    assert devices.pick_dtype(torch.device('cuda', 0), 'auto') == expected
    assert asked == [False]  # emulated bfloat16 (T4, V100, RTX 20xx) does not count
    assert devices.pick_dtype(torch.device('cpu'), 'auto') == 'float32'
    assert devices.pick_dtype(torch.device('cpu'), 'float16') == 'float16'  # CPU autocast has float16


def test_fp16_on_a_cpu_autocasts_and_scales():
    device = torch.device('cpu')
    linear = torch.nn.Linear(4, 4)
    with devices.autocast(device, 'float16'):
        assert linear(torch.randn(2, 4)).dtype == torch.float16
    assert devices.grad_scaler(device, 'float16').is_enabled()
    assert not devices.grad_scaler(device, 'bfloat16').is_enabled()


def test_device_settings_that_cannot_work_here_are_one_line_errors():
    with pytest.raises(ValueError, match="device='gpu' is not one of"):
        devices.pick_device('gpu')
    with pytest.raises(ValueError, match='CUDA is not available'):
        devices.pick_device('cuda')  # this CPU build has no CUDA
    with pytest.raises(ValueError, match="dtype='half' is not one of"):
        devices.pick_dtype(torch.device('cpu'), 'half')
    assert devices.pick_device('auto') == torch.device('cpu')


# ---------------------------------------------------------------------------
# the scripts on a simulated GPU machine


@pytest.mark.slow
def test_training_on_one_simulated_gpu_gets_to_its_first_tensor(workdir):
    gpu = simulated_env(SIMULATED_GPUS=RTX_3070)
    args = [a for a in TINY if not a.startswith(('--device', '--dtype'))]
    proc = run_script(workdir, 'train_bio.py', *args, '--out_dir=auto', check=False, env=gpu)
    assert 'device cuda:0 (NVIDIA GeForce RTX 3070), bfloat16\n' in proc.stdout
    assert 'simulated GPU: set_device(0)' in proc.stderr
    assert first_cuda_tensor(proc, workdir) == 'model.to(device)'
    # the 3070 config as written: device auto, float16 with a GradScaler, on an older GPU too
    for name in (RTX_3070, 'Tesla T4'):
        proc = run_script(workdir, 'train_bio.py', 'config_gpt2_bio_3070.py', '--dataset=tiny', '--block_size=16',
                          '--n_layer=1', '--out_dir=fp16', check=False, env=simulated_env(SIMULATED_GPUS=name))
        assert f'device cuda:0 ({name}), float16 with a GradScaler\n' in proc.stdout
        assert first_cuda_tensor(proc, workdir) == 'model.to(device)'
    # dtype auto on a GPU without native bfloat16 is float16
    proc = run_script(workdir, 'train_bio.py', *args, '--device=cuda', '--out_dir=t4', check=False,
                      env=simulated_env(SIMULATED_GPUS='Tesla T4'))
    assert 'device cuda:0 (Tesla T4), float16 with a GradScaler\n' in proc.stdout
    assert first_cuda_tensor(proc, workdir) == 'model.to(device)'


@pytest.mark.slow
def test_sampling_chat_and_bench_on_a_simulated_gpu_get_to_their_first_tensor(workdir):
    model_args = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50304)
    (workdir / 'out').mkdir()
    save_checkpoint({'model': GPT(GPTConfig(**model_args)).state_dict(), 'model_args': model_args, 'iter_num': 0,
                     'best_val_loss': 9.0, 'config': {}, 'format_version': 1}, str(workdir / 'out' / 'ckpt.pt'))
    gpu = simulated_env(SIMULATED_GPUS=RTX_3070)
    for script in ('sample_bio.py', 'chat.py'):
        proc = run_script(workdir, script, '--out_dir=out', check=False, env=gpu, input='hello\n')
        assert 'simulated GPU: set_device(0)' in proc.stderr
        assert first_cuda_tensor(proc, workdir) == 'model.to(device)'  # load_model's, in checkpoints.py
        assert 'checkpoints.py' in proc.stderr
    (workdir / 'config_bench_tiny.py').write_text("batch_size = 2\nblock_size = 16\nn_layer = 1\nn_head = 2\nn_embd = 32\n")
    proc = run_script(workdir, 'bench_bio.py', 'config_bench_tiny.py', check=False, env=gpu)
    assert 'device: cuda:0 (NVIDIA GeForce RTX 3070), torch' in proc.stdout
    assert 'bench_bio.py' in FIRST_TENSOR.search(proc.stderr).group(1)


@pytest.mark.slow
def test_two_simulated_gpus_one_per_process_or_by_index(workdir):
    two = simulated_env(SIMULATED_GPUS='Tesla T4,' + RTX_3070)
    args = [a for a in TINY if not a.startswith(('--device', '--dtype'))]
    proc = run_script(workdir, 'train_bio.py', *args, '--device=cuda:1', '--out_dir=one', check=False, env=two)
    assert 'device cuda:1 (NVIDIA GeForce RTX 3070), bfloat16\n' in proc.stdout
    assert 'simulated GPU: set_device(1)' in proc.stderr
    assert first_cuda_tensor(proc, workdir) == 'model.to(device)'
    proc = run_script(workdir, 'train_bio.py', *args, '--device=cuda:2', '--out_dir=two', check=False, env=two)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert message_lines(proc.stderr) == ['error: device=cuda:2 but this machine shows 2 CUDA device(s)']
    # torchrun: each process takes cuda:LOCAL_RANK
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_bio.py',
           *args, '--backend=gloo', '--out_dir=ddp']
    (workdir / 'meet').mkdir()  # neither process ends before both are at their first tensor
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=120,
                          env={**two, 'SIMULATED_GPU_MEET': str(workdir / 'meet')})
    assert 'simulated GPU: set_device(0)' in proc.stderr and 'simulated GPU: set_device(1)' in proc.stderr
    assert 'device cuda:0 (Tesla T4), float16 with a GradScaler, 2 processes' in proc.stdout
    assert len(FIRST_TENSOR.findall(proc.stderr)) == 2
