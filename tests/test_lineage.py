"""
WiggleGPT's earlier MLPs (bio_variant v2 and v1, lineage.py) run every way v3 runs: their forward against
lineage.py's formulas, causality, the KV cache, float16/bfloat16 autocast, DDP, the sparsity in the log,
and train_bio.py's training, bit-exact resuming and checkpoint names, export_hub.py's export.

    python -m pytest tests/test_lineage.py              (-m "not slow": the quick ones only)
"""

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import devices
import lineage
import prepared_data
from checkpoints import load_model
from conftest import TINY, load, read_log, run_script
from generation import generate_tokens
from model_bio import GPT, GPTConfig
from test_train import assert_same_state

VARIANTS = ('v1', 'v2')
# n_embd 30 in 4 compartments: slices of 8, the last padded with 2 zeros
SMALL = dict(n_layer=2, n_head=3, n_embd=30, block_size=16, vocab_size=50, use_bio_mlp=True, bio_compartments=4)
CPU = torch.device('cpu')


def small_model(variant, sharp=False, **overrides):
    """A small v1/v2 GPT; sharp: large random weights (biases and lateral mixing included), so that every
    weight and every position moves the output."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(SMALL, bio_variant=variant, **overrides)))
    if sharp:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
    return model


def oscillation(x, activation):
    return torch.sin(activation.omega * x + activation.phi) * torch.tanh(x) + activation.baseline


def reference_mlp(mlp, x, variant, threshold):
    """lineage.py's docstring computed one token at a time with plain ops."""
    rows = []
    for token in x.reshape(-1, x.size(-1)):
        if variant == 'v1':
            dendrites = mlp.dendrites
            k = len(dendrites.branches)
            size = math.ceil(len(token) / k)
            padded = torch.cat([token, token.new_zeros(size * k - len(token))])
            branch = [torch.tanh(F.linear(padded[i * size:(i + 1) * size], b.weight, b.bias))
                      for i, b in enumerate(dendrites.branches)]
            mixed = [sum(dendrites.lateral[i, j] * branch[j] for j in range(k)) for i in range(k)]
            h = F.linear(torch.cat(branch + mixed), dendrites.soma.weight, dendrites.soma.bias)
        else:
            h = F.linear(token, mlp.c_fc.weight, mlp.c_fc.bias)
        a = oscillation(h, mlp.activation)
        event = mlp.event
        voltage = torch.sigmoid(F.linear(a, event.gate.weight, event.gate.bias))
        spike = torch.sigmoid(5.0 * (voltage - threshold))
        fired = oscillation(F.linear(a * spike, event.transform.weight, event.transform.bias), event.activation)
        rows.append(F.linear(fired, mlp.c_proj.weight, mlp.c_proj.bias))
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize('variant', VARIANTS)
def test_the_mlp_computes_lineage_s_formulas(variant):
    config = GPTConfig(**dict(SMALL, bio_variant=variant, bias=True, bio_threshold=0.3))
    torch.manual_seed(0)
    mlp = lineage.make_mlp(config).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 5, 30, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), reference_mlp(mlp, x, variant, 0.3))


@pytest.mark.parametrize('variant', VARIANTS)
def test_later_tokens_and_batch_mates_leave_earlier_logits_alone(variant):
    model = small_model(variant, sharp=True).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 50, (3, 12))
    changed = idx.clone()
    changed[0, 6:] = (idx[0, 6:] + 1) % 50
    changed[1] = (idx[1] + 1) % 50
    with torch.no_grad():
        before, _ = model(idx, all_positions=True)
        after, _ = model(changed, all_positions=True)
    torch.testing.assert_close(after[0, :6], before[0, :6])
    torch.testing.assert_close(after[2], before[2])
    assert (after[0, 6:] - before[0, 6:]).abs().max() > 1e-2 and (after[1] - before[1]).abs().max() > 1e-2


@pytest.mark.parametrize('variant', VARIANTS)
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    idx = torch.randint(0, SMALL['vocab_size'], (2, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = small_model(variant, sharp=True, gradient_checkpointing=checkpointing).train()
        model(idx, targets=idx)[1].backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][name], grads[1][name], atol=1e-6) for name in grads[0])


@pytest.mark.parametrize('variant', VARIANTS)
def test_kv_cache_gives_the_tokens_of_a_full_recompute(variant):
    model = small_model(variant, sharp=True).eval()
    fed = []
    model.transformer.wte.register_forward_hook(lambda mod, inp, out: fed.append(inp[0].numel()))
    results = {}
    for use_cache in (True, False):
        fed.clear()
        generator = torch.Generator().manual_seed(7)
        # 40 new tokens after 5: the text grows well past block_size=16
        results[use_cache] = list(generate_tokens(model, [1, 2, 3, 4, 5], 40, temperature=1.0, top_k=20,
                                                  repetition_penalty=3.0, penalty_window=6, generator=generator,
                                                  use_cache=use_cache))
        results[use_cache, 'fed'] = sum(fed)
    assert results[True] == results[False] and len(set(results[True])) > 5
    assert results[True, 'fed'] < results[False, 'fed']  # the cache was used


@pytest.mark.parametrize('variant', VARIANTS)
def test_training_steps_under_float16_and_bfloat16_autocast(variant):
    torch.manual_seed(1)
    x, y = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    losses = {}
    for dtype in ('float32', 'float16', 'bfloat16'):
        model = small_model(variant)
        seen = []  # the dtype the event layer's matrices ran in
        model.transformer.h[0].mlp.event.transform.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = devices.grad_scaler(CPU, dtype)
        losses[dtype] = []
        for _ in range(3):
            with devices.autocast(CPU, dtype):
                _, loss = model(x, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses[dtype].append(loss.item())
        assert seen[0] == getattr(torch, dtype), dtype
    for dtype, values in losses.items():
        assert all(math.isfinite(v) for v in values) and values[-1] < values[0], (dtype, values)
        assert np.allclose(values, losses['float32'], atol=0.05), (dtype, values, losses['float32'])


DDP_STEPS = """
import inspect, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from model_bio import GPT, GPTConfig

dist.init_process_group('gloo', init_method=sys.argv[1], rank=0, world_size=1)
buffer_sync = ('forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(DDP).parameters
               else 'broadcast_buffers')  # as train_bio.py picks it
x = torch.randint(0, 50, (2, 16))
for variant in ('v1', 'v2'):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, bio_variant=variant))
    ddp = DDP(model, **{buffer_sync: False})
    for _ in range(2):
        ddp(x, x)[1].backward()
    print(variant, all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()))
dist.barrier()
dist.destroy_process_group()
"""


def test_ddp_wraps_v1_and_v2_as_train_bio_does(workdir):
    # one process: DDP still stops at the second step if a parameter got no gradient in the first. In a process of
    # its own: destroying gloo's group in the test process once hung for ever (its thread, freeing the last
    # reduction's thread state, waited for the GIL that this thread held while joining it)
    (workdir / 'ddp_steps.py').write_text(DDP_STEPS.replace('**SMALL', f'**{SMALL!r}'))
    proc = run_script(workdir, 'ddp_steps.py', f'file://{workdir}/store', timeout=120)
    assert proc.stdout.splitlines() == ['v1 True', 'v2 True'], proc.stdout


def sparsity_of(model, batches):
    """The share of event-layer voltages sigmoid(gate(x)) at or below the threshold, over training forwards
    of batches, computed from the gates' outputs."""
    voltages = []
    hooks = [block.mlp.event.gate.register_forward_hook(lambda mod, inp, out: voltages.append(torch.sigmoid(out)))
             for block in model.transformer.h]
    model.train()
    with torch.no_grad():
        for idx in batches:
            model(idx, idx)
    for hook in hooks:
        hook.remove()
    return sum((v <= model.config.bio_threshold).sum().item() for v in voltages) / sum(v.numel() for v in voltages)


@pytest.mark.parametrize('variant', VARIANTS)
def test_sparsity_counts_the_voltages_of_training_forwards(variant):
    # sharp weights spread the voltages over (0, 1); away from 0.5, voltage and spike cross the threshold apart
    model = small_model(variant, sharp=True, bio_threshold=0.3)
    batches = [torch.randint(0, 50, (2, 16)) for _ in range(2)]
    expected = sparsity_of(model, batches)
    model.read_sparsity()  # reset: sparsity_of's forwards were counted
    for idx in batches:  # two micro-batches, then an evaluation, which is not counted
        model(idx, idx)
    model.eval()
    model(batches[0])
    assert 0.05 < expected < 0.95 and model.read_sparsity() == expected
    assert model.read_sparsity() is None  # read, then reset


# -----------------------------------------------------------------------------
# train_bio.py and export_hub.py as users run them

TOKEN = 7  # the one token of data/const's train.bin: every training batch is known
RUN = [*TINY, '--dataset=const', '--use_bio_mlp=True', '--use_rope=False', '--bio_threshold=0.5', '--eval_interval=2']
# v1's 32 inputs in 3 compartments: 11 each, the last padded with 1 zero
RUN_VARIANT = {'v1': ['--bio_variant=v1', '--bio_compartments=3'], 'v2': ['--bio_variant=v2']}


def write_constant_dataset(workdir):
    data = workdir / 'data' / 'const'
    data.mkdir()
    staging = prepared_data.staging_dir(str(data))
    np.full(4000, TOKEN, dtype=np.uint16).tofile(f'{staging}/train.bin')
    for name in ('val.bin', 'meta.pkl'):
        shutil.copy(workdir / 'data' / 'tiny' / name, staging)
    prepared_data.commit(str(data), 'tests/test_lineage.py')


def mlp_shapes(variant, k=3, n=32, h=128):
    """Block 0's MLP weights in a checkpoint, by name (no biases): the names say which module each is."""
    shapes = {'activation.omega': (h,), 'activation.phi': (h,), 'activation.baseline': (h,),
              'event.gate.weight': (h, h), 'event.transform.weight': (h, h), 'event.activation.omega': (h,),
              'event.activation.phi': (h,), 'event.activation.baseline': (h,), 'c_proj.weight': (n, h)}
    if variant == 'v2':
        return {**shapes, 'c_fc.weight': (h, n)}
    branches = {f'dendrites.branches.{i}.weight': (h, math.ceil(n / k)) for i in range(k)}
    return {**shapes, **branches, 'dendrites.lateral': (k, k), 'dendrites.soma.weight': (h, 2 * k * h)}


@pytest.mark.slow
def test_v1_and_v2_train_resume_bit_exactly_log_their_sparsity_and_export(workdir):
    write_constant_dataset(workdir)

    def straight(variant):  # 4 iterations, then exported
        proc = run_script(workdir, 'train_bio.py', *RUN, *RUN_VARIANT[variant], '--max_iters=4',
                          f'--out_dir={variant}-straight')
        run_script(workdir, 'export_hub.py', f'--out_dir={variant}-straight', f'--export_dir={variant}-hub')
        return proc

    def split(variant):  # 2 iterations, its checkpoint kept, then resumed to 4
        run_script(workdir, 'train_bio.py', *RUN, *RUN_VARIANT[variant], '--max_iters=2', f'--out_dir={variant}-split')
        shutil.copy(workdir / f'{variant}-split' / 'ckpt.pt', workdir / f'{variant}-iter2.pt')
        run_script(workdir, 'train_bio.py', *RUN, *RUN_VARIANT[variant], '--max_iters=4', f'--out_dir={variant}-split',
                   '--init_from=resume')

    with ThreadPoolExecutor(4) as pool:
        runs = {(variant, how): pool.submit(how, variant) for variant in VARIANTS for how in (straight, split)}
        procs = {variant: runs[variant, straight].result() for variant in VARIANTS}
        [runs[variant, split].result() for variant in VARIANTS]
    for variant in VARIANTS:
        out = workdir / f'{variant}-straight'
        ckpt = load(out / 'ckpt.pt')
        names = {k[len('transformer.h.0.mlp.'):]: tuple(v.shape) for k, v in ckpt['model'].items()
                 if k.startswith('transformer.h.0.mlp.')}
        assert names == mlp_shapes(variant), variant
        log = read_log(out)
        steps = [r for r in log if 'loss' in r]
        assert [r['iter'] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r['loss']) for r in steps)
        assert all(0 < r['sparsity'] < 1 for r in steps) and 'sparsity ' in procs[variant].stdout

        resumed = load(workdir / f'{variant}-split' / 'ckpt.pt')
        assert ckpt['iter_num'] == resumed['iter_num'] == 4
        assert_same_state(ckpt, resumed)
        assert [r['loss'] for r in read_log(workdir / f'{variant}-split') if 'loss' in r] == [r['loss'] for r in steps]

        # iteration 3 trained the iteration-2 weights on two micro-batches of the one token
        model, _ = load_model(str(workdir / f'{variant}-iter2.pt'), 'cpu')
        batch = torch.full((4, 16), TOKEN)
        logged = next(r['sparsity'] for r in read_log(workdir / f'{variant}-split')
                      if r.get('iter') == 3 and 'loss' in r)
        assert math.isclose(logged, sparsity_of(model, [batch, batch]), abs_tol=1 / (2 * 4 * 16 * 128)), variant

        exported, _ = load_model(str(workdir / f'{variant}-hub'), 'cpu')
        trained, _ = load_model(str(out / 'ckpt.pt'), 'cpu')
        config = json.loads((workdir / f'{variant}-hub' / 'config.json').read_text())
        assert config['architecture']['bio_variant'] == variant
        idx = torch.randint(0, 50, (2, 16))
        assert torch.equal(exported.eval()(idx, idx)[0], trained.eval()(idx, idx)[0])
