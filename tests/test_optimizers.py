"""
optimizers.py: which parameters each optimizer gets, the schedules, the state size; and train_bio.py
with each optimizer as users run it (exact resume, DDP, freezing, a missing package).

    python -m pytest tests/test_optimizers.py              (-m "not slow": the quick ones only)
"""

import importlib.util
import subprocess

import pytest
import torch

import optimizers
from conftest import TINY, load, message_lines, read_log, run_script, simulated_env, trained_straight_and_in_halves
from model_bio import GPT, GPTConfig
from test_ddp import torchrun
from test_train import assert_same_state

MODEL = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, use_bio_mlp=True, use_sparse_gate=True,
             bias=True)
GELU = TINY + ['--use_bio_mlp=False']  # the activation does not matter here: no fused kernel to compile first
INSTALLED = [name for name in optimizers.OPTIMIZERS
             if name not in optimizers.OPTIONAL or importlib.util.find_spec(optimizers.OPTIONAL[name][0])]


def build(model, name, device_type='cpu'):
    return optimizers.build_optimizers(model, name, 1e-3, 0.1, 0.9, 0.95, 0.0, 0.95, device_type)


def held(opts):
    """The ids of the parameters in the optimizers' groups, each as often as it is held."""
    return [id(p) for opt in opts for group in opt.param_groups for p in group['params']]


def test_muon_holds_exactly_the_block_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(**MODEL))
    muon, adamw = build(model, 'muon')
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    named = dict(model.named_parameters())
    block_matrices = {id(p) for name, p in named.items() if name.startswith('transformer.h.') and p.dim() == 2}
    assert len(block_matrices) == 2 * 4  # per block: c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert sorted(held([muon])) == sorted(block_matrices)
    rest = held([adamw])
    assert len(rest) == len(set(rest)) and set(rest) == {id(p) for p in model.parameters()} - block_matrices
    for name in ('transformer.wte.weight', 'transformer.wpe.weight', 'transformer.h.0.mlp.activation.omega',
                 'transformer.h.1.mlp.sparse_gate.gate_weight', 'transformer.h.0.ln_1.bias'):
        assert id(named[name]) in rest, name
    assert muon.param_groups[0]['adjust_lr_fn'] == 'match_rms_adamw' and muon.param_groups[0]['lr'] == 1e-3
    assert optimizers.build_optimizers(model, 'muon', 1e-3, 0.1, 0.9, 0.95, 0.02, 0.9, 'cpu')[0].param_groups[0][
        'lr'] == 0.02


def test_adamw_decays_matrices_only_in_the_model_order_fused_on_cuda():
    model = GPT(GPTConfig(**MODEL))
    opt, = build(model, 'adamw')
    decayed, plain = opt.param_groups
    # the model's order: checkpoints of earlier versions hold AdamW's state by these positions
    assert [id(p) for p in decayed['params']] == [id(p) for p in model.parameters() if p.dim() == 2]
    assert [id(p) for p in plain['params']] == [id(p) for p in model.parameters() if p.dim() == 1]
    assert decayed['weight_decay'] == 0.1 and plain['weight_decay'] == 0.0
    assert opt.defaults['fused'] is None and build(model, 'adamw', 'cuda')[0].defaults['fused'] is True


@pytest.mark.parametrize('name', INSTALLED)
def test_frozen_parameters_sit_in_no_group(name):
    model = GPT(GPTConfig(**MODEL))
    model.transformer.h[0].requires_grad_(False)
    model.transformer.wte.requires_grad_(False)
    ids = held(build(model, name))
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    model.requires_grad_(False)
    assert build(model, name) == []


@pytest.mark.parametrize('name', INSTALLED)
def test_the_state_size_is_measured_without_changing_anything(name):
    model = GPT(GPTConfig(**MODEL))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = build(model, name)
    rates = [group['lr'] for opt in opts for group in opt.param_groups]
    megabytes = optimizers.state_megabytes(opts)
    assert all(not opt.state for opt in opts) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [group['lr'] for opt in opts for group in opt.param_groups] == rates
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for opt in opts:
        opt.step()
    assert megabytes == optimizers.state_megabytes(opts) > 0  # what a real step creates
    if name == 'adamw':  # two moments of every weight, float32, and a step counter per tensor
        params = list(model.parameters())
        assert megabytes * 1e6 == sum(8 * p.numel() + 4 for p in params)


def test_a_resume_loads_the_state_under_the_runs_own_settings():
    # the state of a CPU run, loaded into an optimizer whose settings keep its step counts beside the
    # weights (as fused AdamW on CUDA does): PyTorch places them by the groups it loads, so those
    # must carry this run's settings, not the checkpoint's; so must weight_decay and the betas
    weight = torch.nn.Parameter(torch.randn(4, 4))
    saved_run = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.1)
    weight.grad = torch.randn(4, 4)
    saved_run.step()
    moved = torch.nn.Parameter(torch.randn(4, 4, device='meta'))  # a device the CPU state must move to
    resumed = torch.optim.AdamW([moved], lr=1e-3, weight_decay=0.5, betas=(0.8, 0.9), foreach=False)
    resumed.param_groups[0]['capturable'] = True
    optimizers.load_optimizer_state([resumed], saved_run.state_dict())
    assert resumed.state[moved]['step'].device.type == 'meta' and resumed.state[moved]['exp_avg'].device.type == 'meta'
    assert resumed.param_groups[0]['weight_decay'] == 0.5 and resumed.param_groups[0]['betas'] == (0.8, 0.9)
    with pytest.raises(ValueError, match='other optimizers or parameter groups'):
        optimizers.load_optimizer_state([resumed], [saved_run.state_dict()] * 2)


def test_schedules_at_warmup_end_stable_phase_and_decay_end():
    def lr(schedule, it):
        return optimizers.scheduled_lr(it, schedule, learning_rate=1.0, min_lr=0.1, warmup_iters=10,
                                       lr_decay_iters=100, decay_frac=0.2)
    for schedule in optimizers.SCHEDULES:
        assert lr(schedule, 0) == 1 / 11 and lr(schedule, 9) == 10 / 11  # linear warmup, all alike
        assert lr(schedule, 10) == 1.0  # warmup ends at the peak
    assert lr('cosine', 55) == pytest.approx(0.55)  # half way down
    assert lr('cosine', 100) == lr('cosine', 500) == 0.1
    assert lr('wsd', 50) == lr('wsd', 80) == 1.0  # stable until the last fifth
    assert lr('wsd', 90) == pytest.approx(0.55) and lr('wsd', 99) == pytest.approx(0.145)
    assert lr('wsd', 100) == lr('wsd', 500) == 0.1
    assert lr('constant', 50) == lr('constant', 500) == 1.0
    # a decay that would start inside the warmup starts when the warmup ends
    assert optimizers.scheduled_lr(10, 'wsd', 1.0, 0.0, warmup_iters=10, lr_decay_iters=20, decay_frac=0.9) == 1.0
    assert optimizers.scheduled_lr(15, 'wsd', 1.0, 0.0, warmup_iters=10, lr_decay_iters=20, decay_frac=0.9) == 0.5


@pytest.mark.slow
@pytest.mark.parametrize('name', [name for name in INSTALLED if name != 'adamw'])  # adamw: test_train.py's resume test
def test_each_optimizer_trains_and_resumes_bit_exactly(workdir, name):
    common = [*GELU, f'--optimizer={name}', '--eval_interval=4', '--lr_schedule=wsd', '--lr_decay_iters=8']
    if name == 'adafactor':
        common.append('--learning_rate=0.05')  # a relative step
    if name == 'lion':
        common.append('--learning_rate=1e-3')  # Lion's steps are larger than AdamW's at the same rate
    straight = trained_straight_and_in_halves(workdir, 'train_bio.py', *common, iters=8)
    assert f'optimizer {name}: ' in straight.stdout and ' MB' in straight.stdout
    a, b = load(workdir / 'straight' / 'ckpt.pt'), load(workdir / 'split' / 'ckpt.pt')
    assert a['iter_num'] == b['iter_num'] == 8 and a['config']['optimizer'] == name
    if name == 'muon':  # two optimizers: their states in a list
        assert len(a['optimizer']) == len(b['optimizer']) == 2
        for state_a, state_b in zip(a['optimizer'], b['optimizer']):
            assert_same_state({'model': a['model'], 'optimizer': state_a}, {'model': b['model'], 'optimizer': state_b})
    else:
        assert_same_state(a, b)
    evals = [r['val_loss'] for r in read_log(workdir / 'straight') if 'val_loss' in r]
    assert evals[-1] < evals[0], evals  # it learns (random tokens: little to learn beyond their frequencies)


@pytest.mark.slow
def test_a_run_keeps_its_optimizer_and_missing_packages_are_one_line(workdir):
    run_script(workdir, 'train_bio.py', *GELU, '--max_iters=2', '--eval_interval=2', '--out_dir=out')
    # a resume takes new optimizer settings, but not other weights to train
    run_script(workdir, 'train_bio.py', *GELU, '--max_iters=4', '--eval_interval=2', '--out_dir=out',
               '--init_from=resume', '--weight_decay=0.5', '--beta2=0.9')
    groups = load(workdir / 'out' / 'ckpt.pt')['optimizer']['param_groups']
    assert [(g['weight_decay'], g['betas']) for g in groups] == [(0.5, (0.9, 0.9)), (0.0, (0.9, 0.9))]
    proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=6', '--eval_interval=2', '--out_dir=out',
                      '--init_from=resume', '--freeze_layers=1', check=False)
    assert proc.returncode == 2 and message_lines(proc.stderr) == [
        'error: out/ckpt.pt holds optimizer state for other parameters than this run trains (loaded state dict '
        "contains a parameter group that doesn't match the size of optimizer's group); resume with the freeze "
        'settings it was trained with'], proc.stderr
    proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=4', '--eval_interval=2', '--out_dir=out',
                      '--init_from=resume', '--optimizer=muon', check=False)
    assert proc.returncode == 2 and message_lines(proc.stderr) == [
        'error: out/ckpt.pt was trained with optimizer=adamw, asked muon: a run keeps its optimizer (start a new '
        'run from its weights with --init_from=out/ckpt.pt --out_dir=...)']
    for name, module, package in (('lion', 'lion_pytorch', 'lion-pytorch'), ('adamw8bit', 'bitsandbytes', 'bitsandbytes')):
        proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=2', f'--optimizer={name}', '--out_dir=new',
                          check=False, env=simulated_env(SIMULATED_MISSING=module))
        assert proc.returncode == 2 and message_lines(proc.stderr) == [
            f'error: optimizer={name} needs the {package} package: pip install {package} (or choose another optimizer)']


@pytest.mark.slow
def test_muon_with_frozen_layers_leaves_them_and_trains_the_rest(workdir):
    frozen = [*GELU, '--n_layer=3', '--optimizer=muon', '--freeze_layers=1', '--eval_interval=4',
              '--muon_learning_rate=0.02']  # twice learning_rate (1e-2)
    run_script(workdir, 'train_bio.py', *frozen, '--max_iters=0', '--out_dir=start')
    run_script(workdir, 'train_bio.py', *frozen, '--max_iters=4', '--out_dir=out')
    start, end = load(workdir / 'start' / 'ckpt.pt'), load(workdir / 'out' / 'ckpt.pt')
    for name, tensor in start['model'].items():
        assert torch.equal(tensor, end['model'][name]) == name.startswith('transformer.h.0.'), name
    muon_state, adamw_state = end['optimizer']
    assert len(muon_state['state']) == 2 * 4 and muon_state['param_groups'][0]['params'] == list(range(8))
    # both follow the schedule, each from its own rate: the last step (iteration 3) on cosine
    scheduled = optimizers.scheduled_lr(3, 'cosine', 1e-2, end['config']['min_lr'], 2, 40, 0.2)
    assert [g['lr'] for g in adamw_state['param_groups']] == [scheduled, scheduled]
    assert muon_state['param_groups'][0]['lr'] == 2 * scheduled


@pytest.mark.slow
def test_muon_under_torchrun_steps_as_one_process(workdir):
    step = [*GELU, '--optimizer=muon', '--max_iters=1', '--eval_interval=100', '--grad_clip=0.0', '--warmup_iters=0']
    run_script(workdir, 'train_bio.py', *step, '--out_dir=one')
    proc = subprocess.run(torchrun('train_bio.py', *step, '--out_dir=two'), cwd=workdir, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = load(workdir / 'one' / 'ckpt.pt'), load(workdir / 'two' / 'ckpt.pt')
    for state_one, state_two in zip(one['optimizer'], two['optimizer']):
        assert state_one['state'].keys() == state_two['state'].keys()
        for index, state in state_one['state'].items():
            for key, value in state.items():
                assert key == 'step' or value.abs().sum() > 0, (index, key)  # the step's gradients are in it
                torch.testing.assert_close(state_two['state'][index][key], value, rtol=1e-4, atol=1e-7)
    for name, tensor in one['model'].items():
        torch.testing.assert_close(two['model'][name], tensor, rtol=1e-4, atol=1e-6)
