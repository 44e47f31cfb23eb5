"""
Speed and memory of WiggleGPT against GELU, measured side by side in one run. Settings as for
train_bio.py: a config file (the model, batch and run to measure) and --key=value overrides.

    python bench_bio.py config_shakespeare_char_cpu.py --bench_out=bench.json
    python bench_bio.py config_shakespeare_char_cpu.py --part=whole        (whole training runs)
    python bench_bio.py config_gpt2_bio_3070.py --dtype=bfloat16 --batch_size=8   (a GPU)

part 'steps' (the default) measures, each round running every variant once in a new random order
(so drifts in machine load hit them alike), medians over the rounds:
- act: the activation alone on a (batch_size * block_size, 4 * n_embd) input, forward + backward
  time and bytes kept for backward, for each implementation of oscillation.py and for GELU.
- step: a whole training step (forward, backward, AdamW) of the config's model, bio vs GELU,
  eager, with the unfused activation, and compiled: tokens/s, MFU on GPUs, and peak memory on
  CUDA (bytes kept for backward on CPU). bio is the config's bio_variant; --bio_variants=v3,v2,v1
  adds a row for each other one listed (bio_v2, bio_v1: WiggleGPT's earlier MLPs, lineage.py),
  eager and compiled, measured in the same rounds; --mlp_kinds=swiglu,relu2,bio_glu adds a row for
  each of those MLPs (model_bio.py), against the same GELU rows; --moe_sizes=4,8 adds a row for the bio model's
  MLP as a static mixture of that many experts (bio_moe4, ...: moe.py, top moe_top_k, as many active parameters
  per token as the dense MLP), its ratios taken against the bio row (the step without the energy accounts, a few
  small tensor operations per layer); --synapses=presynaptic,stochastic,fast_weights,all
  adds a row for the bio model with each of synapses.py's mechanisms (bio_presynaptic, ...), its
  ratios taken against the bio row. The GELU step is timed twice, under two names
  (gelu and gelu_twin): twin / GELU shows how far from 1 a ratio strays by chance on this machine.
- attn: one attention layer alone at the config's batch and shape, forward + backward: PyTorch's
  fused scaled_dot_product_attention against presynaptic depression (synapses.py), which computes the
  attention weights itself, synapse_chunk queries at a time; and a layer's fast-weight scratchpad
  (synapses.py, chunked likewise); time and memory (peak on CUDA, kept for backward on CPU).
- optim: the optimizer step alone (on fixed random gradients) of each optimizer of optimizers.py
  for the config's model: median ms per step and the bytes of its state, side by side; an optimizer
  whose package is not installed is listed as such.
- sample: generation tokens/s with and without the KV cache, for the model shape of
  config_shakespeare_char_bio.py (6 layers, 6 heads, 384 wide), 500 new tokens from a 1-token
  prompt, with a context that holds them all and with that config's block_size of 256, where
  every step past 256 tokens must recompute the whole window.
part 'whole' times what a user waits for: whole_pairs pairs of train_bio.py runs of the config
(bio, then GELU; whole_iters iterations each, evaluations included), each a new process timed by
the wall clock from start to exit (startup, data, compiling, training), and reports the median
bio / GELU ratio of the pairs with their range.
The ratios in the JSON (bio / GELU; below 1 is faster or leaner) are act_saved_bytes_ratio,
act_time_ratio_eager, act_time_ratio_unfused, act_time_ratio_compiled, step_time_ratio_eager,
step_time_ratio_compiled and step_memory_ratio, with step_twin_ratio_eager and
step_twin_ratio_compiled beside them; for each added variant (v2, say) step_time_ratio_eager_v2,
step_time_ratio_compiled_v2 and step_memory_ratio_v2, each against the same GELU rows, and so for each
added MLP (step_time_ratio_eager_swiglu, ...); for each
mixture (moe4, say) step_time_ratio_eager_moe4, ..._compiled_moe4 and step_memory_ratio_moe4 against the bio row; for each
mechanism (presynaptic, say) step_time_ratio_eager_presynaptic, ..._compiled_presynaptic and
step_memory_ratio_presynaptic against the bio row; attn_time_ratio_presynaptic and
attn_memory_ratio_presynaptic (presynaptic / SDPA), attn_time_ratio_fast_weights and
attn_memory_ratio_fast_weights (the scratchpad / SDPA); whole_run_time_ratio (with whole_run_ratio_range).

--part also takes act, attn, step, optim or sample to run that part alone (--part=optim: the optimizers).
The bench's own settings, beside train_bio.py's: part, rounds (40), act_calls (10), sample_repeats
(3), new_tokens (500), whole_pairs (5), whole_iters (400), bench_compiled (True; False where
torch.compile cannot build, e.g. GPUs on Windows), bio_variants ('': the config's bio_variant alone),
mlp_kinds ('': none), moe_sizes ('': none), synapses ('': none) and bench_out (a JSON file for the figures).

    python bench_bio.py config_shakespeare_char_cpu.py --part=step --bio_variants=v3,v2,v1
    python bench_bio.py config_shakespeare_char_cpu.py --part=step --mlp_kinds=swiglu,relu2,bio_glu
    python bench_bio.py config_shakespeare_char_cpu.py --part=step --moe_sizes=4,8
    python bench_bio.py config_shakespeare_char_cpu.py --part=step --synapses=presynaptic,stochastic,fast_weights,all
    python bench_bio.py config_gpt2_bio_3070.py --part=attn --batch_size=1 --rounds=5   (the 124M shape)
"""

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields

from configurator import check_folder, configure, declared_rules, fail, script_defaults

REPO = os.path.dirname(os.path.abspath(__file__))
# the bench's own settings, beside train_bio.py's (which say what model, batch and run to measure)
BENCH_SETTINGS = dict(
    part='steps',  # 'steps' (all of act, step, optim, sample), one of those, or 'whole' (whole runs)
    rounds=40,  # timed rounds, each variant once per round; medians reported
    act_calls=10,  # calls of the activation alone per variant and round (each takes well under a millisecond)
    sample_repeats=3,
    new_tokens=500,
    whole_pairs=5,  # whole runs: this many bio, GELU pairs
    whole_iters=400,  # iterations of each whole run (in place of the config's max_iters)
    bench_compiled=True,  # also time torch.compile'd variants (False where it cannot compile, e.g. GPUs on Windows)
    bio_variants='',  # the training step of these bio MLPs too, e.g. 'v3,v2,v1' ('' is the config's bio_variant alone)
    synapses='',  # the training step with these of synapses.py's mechanisms too, e.g. 'presynaptic,fast_weights,all'
    mlp_kinds='',  # the training step with these MLPs too (a row each against GELU), e.g. 'swiglu,relu2,bio_glu'
    moe_sizes='',  # the training step with bio's MLP as a static mixture of these many experts too, e.g. '4,8'
    bench_out='',  # write the figures to this JSON file
)
# what each of them allows, in the rules train_bio.py declares its own in (configurator.py checks both)
BENCH_RULES = {'part': 'one of steps, act, attn, step, optim, sample, whole', 'rounds': '>= 1', 'act_calls': '>= 1',
               'sample_repeats': '>= 1', 'new_tokens': '>= 1', 'whole_pairs': '>= 1', 'whole_iters': '>= 1'}
TRAIN_SCRIPT = os.path.join(REPO, 'train_bio.py')
TRAIN_DEFAULTS = script_defaults(TRAIN_SCRIPT)
# read before torch is imported: a mistake in them is named at once, not after torch's two seconds
cfg = configure({**TRAIN_DEFAULTS, **BENCH_SETTINGS}, sys.argv[1:], {**declared_rules(TRAIN_SCRIPT), **BENCH_RULES})

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import devices  # noqa: E402
import model_bio  # noqa: E402
import oscillation  # noqa: E402
import synapses  # noqa: E402
from checkpoints import config_problem  # noqa: E402
from files import WriteError, write_file  # noqa: E402
from generation import generate_tokens  # noqa: E402
from model_bio import GPT, GPTConfig  # noqa: E402
from optimizers import OPTIMIZERS, build_optimizers, state_bytes  # noqa: E402

# bench_step's rows for synapses.py's mechanisms: the GPTConfig flags each adds to the bio arm
SYNAPSE_FLAGS = {'presynaptic': dict(use_presynaptic=True),
                 'stochastic': dict(use_presynaptic=True, stochastic_release=True),
                 'fast_weights': dict(use_fast_weights=True),
                 'all': dict(use_presynaptic=True, stochastic_release=True, use_fast_weights=True)}
ADDED_KINDS = [k for k in model_bio.MLP_KINDS if k not in ('bio', 'gelu')]  # the MLPs --mlp_kinds may add rows for


def median_times(variants, device, rounds, calls):
    """Median seconds per call of each variant. Every round runs each variant once, in a new
    random order, so neither a drift in machine load nor what ran just before favours one."""
    times = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            devices.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                variants[name]()
            devices.synchronize(device)
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def memory_of(device, step, forward):
    """Bytes a variant needs: on CUDA the peak allocated while step runs, elsewhere what autograd keeps for
    backward while forward runs."""
    if device.type == 'cuda':
        devices.reset_peak_memory(device)
        step()
        return devices.peak_memory(device)[0]
    return devices.saved_bytes(forward)


def with_impl(impl, fn):
    """fn run with oscillation.OSCILLATION_IMPL set to impl."""
    def run():
        previous, oscillation.OSCILLATION_IMPL = oscillation.OSCILLATION_IMPL, impl
        try:
            return fn()
        finally:
            oscillation.OSCILLATION_IMPL = previous
    return run


def config_model(cfg, **changes):
    """The GPTConfig of the config's model, with changes; its vocabulary is tiny Shakespeare's 65
    characters or GPT-2's padded BPE."""
    model_args = {f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg}
    model_args['vocab_size'] = 65 if 'shakespeare_char' in cfg['dataset'] else 50304
    return GPTConfig(**{**model_args, **changes})


def bench_activation(cfg, device, autocast):
    n = 4 * cfg['n_embd']
    torch.manual_seed(0)
    x = torch.randn(cfg['batch_size'] * cfg['block_size'], n, device=device, requires_grad=True)
    act = oscillation.OscillatingActivation(n).to(device)
    grad = torch.randn_like(x)

    def forward_backward(fn):
        def run():
            with autocast:
                out = fn(x)
            out.backward(grad.to(out.dtype))
        return run

    variants = {'gelu': forward_backward(F.gelu)}
    for impl in ('plain', 'function', 'fused'):
        variants[impl] = with_impl(impl, forward_backward(act))
    if cfg['bench_compiled']:
        variants['gelu_compiled'] = forward_backward(torch.compile(F.gelu))
        variants['bio_compiled'] = forward_backward(torch.compile(act))
    for fn in variants.values():  # warm up (and compile) before timing
        fn()
    times = median_times(variants, device, cfg['rounds'], cfg['act_calls'])
    memory = {name: devices.saved_bytes(fn) for name, fn in variants.items() if 'compiled' not in name}
    eager_impl = 'function' if oscillation.fused_kernels.get('forward') is False else 'fused'  # what 'auto' trains with
    print(f"\nactivation alone, input {tuple(x.shape)}: forward + backward")
    for name in variants:
        kept = f"{memory[name] / 2**20:8.2f} MiB kept" if name in memory else ''
        print(f"  {name:15s} {times[name] * 1e3:8.3f} ms  {times[name] / times['gelu']:5.2f}x GELU  {kept}")
    results = {'input_shape': list(x.shape), 'time_s': times, 'saved_bytes': memory,
               'act_saved_bytes_ratio': memory[eager_impl] / memory['gelu'],
               'act_time_ratio_eager': times[eager_impl] / times['gelu'],
               'act_time_ratio_unfused': times['function'] / times['gelu']}
    if cfg['bench_compiled']:
        results['act_time_ratio_compiled'] = times['bio_compiled'] / times['gelu_compiled']
    return results


def bench_attention(cfg, device, autocast):
    """One attention layer, forward + backward, at the config's batch and shape: PyTorch's fused SDPA against
    presynaptic depression, which computes the attention weights itself, chunk by chunk (synapses.py); and
    the fast weights' scratchpad (a layer's, beside its MLP), whose training form is chunked likewise."""
    torch.manual_seed(0)
    x = torch.randn(cfg['batch_size'], cfg['block_size'], cfg['n_embd'], device=device, requires_grad=True)
    layers = {name: model_bio.CausalSelfAttention(config_model(cfg, dropout=0.0, use_presynaptic=presynaptic)).to(device)
              for name, presynaptic in (('sdpa', False), ('presynaptic', True))}
    layers['fast_weights'] = synapses.FastWeights(config_model(cfg, dropout=0.0, use_fast_weights=True)).to(device)

    def forward_backward(layer):
        def run():
            with autocast:
                out = layer(x)
            out.float().sum().backward()
        return run
    variants = {name: forward_backward(layer) for name, layer in layers.items()}
    for fn in variants.values():
        fn()
    times = median_times(variants, device, cfg['rounds'], 1)
    memory = {name: memory_of(device, fn, fn) for name, fn in variants.items()}
    kind = 'peak allocated' if device.type == 'cuda' else 'kept for backward'
    print(f"\nattention layer alone, batch {cfg['batch_size']} x {cfg['block_size']} tokens, {cfg['n_head']} heads x "
          f"{cfg['n_embd'] // cfg['n_head']}, chunks of {cfg['synapse_chunk']}: forward + backward (fast_weights: "
          f"the scratchpad of rank {cfg['fast_weight_rank']})")
    for name in variants:
        print(f"  {name:12s} {times[name] * 1e3:9.2f} ms  {times[name] / times['sdpa']:6.2f}x SDPA  "
              f"{memory[name] / 2**20:9.1f} MiB {kind}  {memory[name] / memory['sdpa']:6.2f}x SDPA")
    return {'time_s': times, 'memory_bytes': memory, 'memory_kind': kind,
            'attn_time_ratio_presynaptic': times['presynaptic'] / times['sdpa'],
            'attn_memory_ratio_presynaptic': memory['presynaptic'] / memory['sdpa'],
            'attn_time_ratio_fast_weights': times['fast_weights'] / times['sdpa'],
            'attn_memory_ratio_fast_weights': memory['fast_weights'] / memory['sdpa']}


def bio_arm(cfg, variant):
    """The GPTConfig changes of the bio arm of this variant: the sparse gate is v3's (v2 and v1 have their event
    layer); gelu_params_like widens the GELU arm alone."""
    return dict(mlp='bio', bio_variant=variant, use_sparse_gate=cfg['use_sparse_gate'] and variant == 'v3',
                gelu_params_like='')


def moe_arm(cfg, n):
    """The bio arm's MLP as a static mixture of n experts: every slot active, none free to split into, none to
    merge away."""
    return dict(bio_arm(cfg, cfg['bio_variant']), use_moe=True, moe_experts=n, moe_max_experts=n,
                moe_min_experts=min(n, cfg['moe_min_experts']))


def bench_step(cfg, device, autocast, dtype, bio_variants, synapse_rows=(), mlp_rows=(), moe_rows=()):
    vocab_size = config_model(cfg).vocab_size
    B, T = cfg['batch_size'], cfg['block_size']
    torch.manual_seed(0)
    x = torch.randint(0, vocab_size, (B, T), device=device)
    y = torch.randint(0, vocab_size, (B, T), device=device)
    scaler = devices.grad_scaler(device, dtype)
    # bio is the config's bio_variant, as before variants could be listed; each other variant its own row
    variant_of = {'bio': cfg['bio_variant'], **{f'bio_{v}': v for v in bio_variants if v != cfg['bio_variant']}}
    arms = {arm: bio_arm(cfg, v) for arm, v in variant_of.items()}
    for mechanism in synapse_rows:  # the config's bio model with a mechanism of synapses.py
        arms[f'bio_{mechanism}'] = {**arms['bio'], **SYNAPSE_FLAGS[mechanism]}
    for n in moe_rows:
        arms[f'bio_moe{n}'] = moe_arm(cfg, n)
    arms['gelu'] = dict(mlp='gelu', bio_variant='v3', use_sparse_gate=False)
    for kind in mlp_rows:  # the field's MLPs and the gated oscillation, at their own widths (model_bio.mlp_width)
        arms[kind] = dict(mlp=kind, bio_variant='v3', use_sparse_gate=False, gelu_params_like='', gelu_tanh=False)
    models, variants = {}, {}
    for arm, changes in arms.items():
        model = GPT(config_model(cfg, **{'dropout': 0.0, 'use_moe': False, **changes})).to(device)  # dense but the MoE rows
        optimizer, = build_optimizers(model, 'adamw', 1e-4, 0.1, 0.9, 0.95, 0.0, 0.95, device.type)
        for compiled in ((False, True) if cfg['bench_compiled'] else (False,)):
            run_model = torch.compile(model) if compiled else model

            def step(run_model=run_model, optimizer=optimizer):
                with autocast:
                    _, loss = run_model(x, y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            name = arm + ('_compiled' if compiled else '')
            variants[name], models[name] = step, model
        if arm == 'bio':  # the unfused autograd function, as where nothing compiles (e.g. CUDA on Windows)
            variants['bio_unfused'], models['bio_unfused'] = with_impl('function', variants['bio']), model
    # the GELU step timed a second time under another name: how far twin / GELU strays from 1 is
    # how far any ratio here can stray by chance alone
    for name in [n for n in variants if n.startswith('gelu')]:
        twin = name.replace('gelu', 'gelu_twin')
        variants[twin], models[twin] = variants[name], models[name]
    for fn in variants.values():
        for _ in range(2):
            fn()
    # on a CPU, the arms' forward alone: the twins and the unfused variant share their models
    memory = {name: memory_of(device, fn, lambda: models[name](x, y)) for name, fn in variants.items()
              if device.type == 'cuda' or name in arms}
    times = median_times(variants, device, cfg['rounds'], 1)
    peak, _ = devices.peak_flops(device)
    print(f"\ntraining step: batch {B} x {T} tokens, {dtype}; bio is bio_variant {cfg['bio_variant']}")
    results = {'tokens_per_step': B * T, 'bio_variant': cfg['bio_variant'], 'time_s': times, 'memory_bytes': memory,
               'memory_kind': 'peak allocated' if device.type == 'cuda' else 'kept for backward', 'mfu': {}}
    for name in variants:
        tokens_per_s = B * T / times[name]
        mfu = models[name].estimate_mfu(tokens_per_s, peak)
        results['mfu'][name] = mfu
        mem = f"{memory[name] / 2**20:9.1f} MiB {results['memory_kind']}" if name in memory else ''
        mfu_text = f"mfu {mfu * 100:5.1f}%" if mfu is not None else ''
        print(f"  {name:18s} {times[name] * 1e3:9.2f} ms  {tokens_per_s:10.0f} tok/s  {mem}  {mfu_text}")
    for mode in ('eager', 'compiled') if cfg['bench_compiled'] else ('eager',):
        suffix = '_compiled' if mode == 'compiled' else ''
        results[f'step_time_ratio_{mode}'] = times['bio' + suffix] / times['gelu' + suffix]
        results[f'step_twin_ratio_{mode}'] = times['gelu_twin' + suffix] / times['gelu' + suffix]
        for arm, v in list(variant_of.items())[1:]:
            results[f'step_time_ratio_{mode}_{v}'] = times[arm + suffix] / times['gelu' + suffix]
        for mechanism in synapse_rows:  # against the same model without it
            results[f'step_time_ratio_{mode}_{mechanism}'] = times[f'bio_{mechanism}{suffix}'] / times['bio' + suffix]
        for kind in mlp_rows:
            results[f'step_time_ratio_{mode}_{kind}'] = times[kind + suffix] / times['gelu' + suffix]
        for n in moe_rows:
            results[f'step_time_ratio_{mode}_moe{n}'] = times[f'bio_moe{n}{suffix}'] / times['bio' + suffix]
    results['step_memory_ratio'] = memory['bio'] / memory['gelu']
    for arm, v in list(variant_of.items())[1:]:
        results[f'step_memory_ratio_{v}'] = memory[arm] / memory['gelu']
    for mechanism in synapse_rows:
        results[f'step_memory_ratio_{mechanism}'] = memory[f'bio_{mechanism}'] / memory['bio']
    for kind in mlp_rows:
        results[f'step_memory_ratio_{kind}'] = memory[kind] / memory['gelu']
    for n in moe_rows:
        results[f'step_memory_ratio_moe{n}'] = memory[f'bio_moe{n}'] / memory['bio']
    return results


def bench_optimizers(cfg, device):
    """Each optimizer's step on the config's model: median seconds and its state's bytes."""
    torch.manual_seed(0)
    model = GPT(config_model(cfg)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    variants, built, missing = {}, {}, []
    for name in OPTIMIZERS:
        try:
            built[name] = build_optimizers(model, name, cfg['learning_rate'], cfg['weight_decay'], cfg['beta1'],
                                           cfg['beta2'], cfg['muon_learning_rate'], cfg['muon_momentum'], device.type)
        except ImportError:
            missing.append(name)
            continue
        variants[name] = lambda opts=built[name]: [opt.step() for opt in opts]
    for fn in variants.values():
        fn()  # the state is created at the first step
    times = median_times(variants, device, cfg['rounds'], 1)
    print(f'\noptimizer step, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M weights')
    results = {'time_s': times, 'state_bytes': {name: state_bytes(built[name]) for name in variants},
               'not_installed': missing}
    for name in variants:
        print(f"  {name:10s} {times[name] * 1e3:9.2f} ms  {times[name] / times['adamw']:5.2f}x adamw  "
              f"state {results['state_bytes'][name] / 1e6:8.2f} MB  "
              f"{results['state_bytes'][name] / results['state_bytes']['adamw']:5.2f}x adamw")
    for name in missing:
        print(f'  {name:10s} not installed')
    return results


def bench_sample(cfg, device):
    """tokens/s generating cfg['new_tokens'] greedy tokens, with and without the KV cache."""
    results = {}
    print(f"\nsampling {cfg['new_tokens']} tokens, 6 layers x 384 (config_shakespeare_char_bio.py)")
    for block_size in (1024, 256):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=block_size, vocab_size=65,
                              use_bio_mlp=True, bias=False)).to(device).eval()
        variants = {use_cache: (lambda use_cache=use_cache: list(generate_tokens(
            model, [0], cfg['new_tokens'], temperature=0, use_cache=use_cache))) for use_cache in (True, False)}
        times = median_times(variants, device, cfg['sample_repeats'], 1)
        cached, uncached = cfg['new_tokens'] / times[True], cfg['new_tokens'] / times[False]
        results[f'block_size_{block_size}'] = {'tokens_per_s_cache': cached, 'tokens_per_s_no_cache': uncached,
                                               'cache_speedup': cached / uncached}
        print(f'  block_size {block_size:5d}: {cached:8.1f} tok/s with cache, {uncached:8.1f} without, '
              f'{cached / uncached:5.2f}x')
    return results


def bench_whole_runs(cfg, train_defaults):
    """Wall-clock seconds of whole train_bio.py runs, bio and GELU alternating, each a new process."""
    # the runs get the training settings as the bench resolved them (config files may hold bench
    # settings too, which train_bio.py would refuse), whole_iters in place of max_iters
    settings = [f'--{k}={v}' for k, v in cfg.items() if k in train_defaults and v != train_defaults[k]
                and k not in ('max_iters', 'out_dir', 'mlp', 'use_bio_mlp', 'use_sparse_gate', 'bio_variant', 'gelu_params_like')]
    arms = {'bio': ['--mlp=bio', f"--use_sparse_gate={cfg['use_sparse_gate']}",
                    f"--bio_variant={cfg['bio_variant']}"],  # the gate and the variants are the bio MLP's
            'gelu': ['--mlp=gelu', '--use_sparse_gate=False', f"--gelu_params_like={cfg['gelu_params_like']}"]}
    times = {arm: [] for arm in arms}
    print(f"\nwhole runs of train_bio.py {' '.join(settings)}: {cfg['whole_iters']} iterations, "
          f"{cfg['whole_pairs']} pairs (bio, GELU)")
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(cfg['whole_pairs']):
            for arm, arm_settings in arms.items():
                run_dir = os.path.join(scratch, f'{arm}{pair}')
                command = [sys.executable, os.path.join(REPO, 'train_bio.py'), *settings, *arm_settings,
                           f"--max_iters={cfg['whole_iters']}", f'--out_dir={run_dir}']
                start = time.perf_counter()
                run = subprocess.run(command, capture_output=True, text=True)
                times[arm].append(time.perf_counter() - start)
                if run.returncode != 0:
                    tail = (run.stderr.strip().splitlines() or ['(no output)'])[-1]
                    fail(f'the {arm} run failed (exit {run.returncode}): {tail}')
                shutil.rmtree(run_dir, ignore_errors=True)  # a 124M run's checkpoints are gigabytes
            print(f"  pair {pair + 1}: bio {times['bio'][-1]:7.2f} s, GELU {times['gelu'][-1]:7.2f} s, "
                  f"{times['bio'][-1] / times['gelu'][-1]:.3f}")
    ratios = [b / g for b, g in zip(times['bio'], times['gelu'])]
    print(f'  bio / GELU: median {statistics.median(ratios):.3f}, range {min(ratios):.3f} to {max(ratios):.3f}')
    return {'time_s': times, 'ratios': ratios, 'whole_run_time_ratio': statistics.median(ratios),
            'whole_run_ratio_range': [min(ratios), max(ratios)]}


def main():
    # the model's settings as train_bio.py checks them, so the bench measures only models it could train
    model_config = {**asdict(GPTConfig()), **{f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg}}
    problem = config_problem(model_config)
    if problem:
        fail(problem)
    if cfg['bench_out']:  # now, not once the benchmark is done
        if os.path.isdir(cfg['bench_out']):
            fail(f"bench_out={cfg['bench_out']} is a folder; name a JSON file to write")
        check_folder('bench_out', os.path.dirname(cfg['bench_out']) or '.')
    parts = {'steps': ('act', 'attn', 'step', 'optim', 'sample')}.get(cfg['part'], (cfg['part'],))
    bio_variants = [v.strip() for v in cfg['bio_variants'].split(',') if v.strip()]
    if not set(bio_variants) <= {'v3', 'v2', 'v1'}:
        fail(f"bio_variants={cfg['bio_variants']!r} must list bio variants out of v3, v2, v1, e.g. 'v3,v2,v1'")
    synapse_rows = [m.strip() for m in cfg['synapses'].split(',') if m.strip()]
    if not set(synapse_rows) <= set(SYNAPSE_FLAGS):
        fail(f"synapses={cfg['synapses']!r} must list mechanisms out of {', '.join(SYNAPSE_FLAGS)}, "
             "e.g. 'presynaptic,fast_weights,all'")
    mlp_rows = [k.strip() for k in cfg['mlp_kinds'].split(',') if k.strip()]
    if not set(mlp_rows) <= set(ADDED_KINDS):
        fail(f"mlp_kinds={cfg['mlp_kinds']!r} must list MLPs out of {', '.join(ADDED_KINDS)} (bio and gelu always have "
             "their rows), e.g. 'swiglu,relu2,bio_glu'")
    sizes = [n.strip() for n in cfg['moe_sizes'].split(',') if n.strip()]
    if not all(re.fullmatch('[0-9]{1,6}', n) for n in sizes):
        fail(f"moe_sizes={cfg['moe_sizes']!r} must list numbers of experts, e.g. '4,8'")
    moe_rows = sorted({int(n) for n in sizes})
    for n in moe_rows:  # each mixture as train_bio.py would check it
        problem = config_problem({**model_config, **moe_arm(cfg, n)})
        if problem:
            fail(f"moe_sizes={cfg['moe_sizes']!r}: {problem}")
    report = {'torch': torch.__version__, 'argv': sys.argv[1:]}
    if 'whole' in parts:
        report['whole'] = bench_whole_runs(cfg, TRAIN_DEFAULTS)
    else:
        try:
            device = devices.pick_device(cfg['device'])
            dtype = devices.pick_dtype(device, cfg['dtype'])
        except ValueError as e:
            fail(str(e))
        autocast = devices.autocast(device, dtype)
        report.update(device=devices.describe(device), dtype=dtype)
        print(f"device: {report['device']}, torch {torch.__version__}, {dtype}")
        if 'act' in parts:
            report['act'] = bench_activation(cfg, device, autocast)
        if 'attn' in parts:
            report['attn'] = bench_attention(cfg, device, autocast)
        if 'step' in parts:
            report['step'] = bench_step(cfg, device, autocast, dtype, bio_variants, synapse_rows, mlp_rows, moe_rows)
        if 'optim' in parts:
            report['optim'] = bench_optimizers(cfg, device)
        if 'sample' in parts:
            with torch.no_grad():
                report['sample'] = bench_sample(cfg, device)
    for part in ('act', 'attn', 'step', 'whole'):
        for key, value in report.get(part, {}).items():
            if key.endswith('_ratio') or '_ratio_' in key:
                report[key] = value
    print('\n' + '\n'.join(f'{k} = {v:.3f}' for k, v in report.items() if '_ratio' in k and not isinstance(v, list)))
    if cfg['bench_out']:
        os.makedirs(os.path.dirname(cfg['bench_out']) or '.', exist_ok=True)
        write_file(cfg['bench_out'], json.dumps(report, indent=2))
        print(f"wrote {cfg['bench_out']}")


if __name__ == '__main__':
    try:
        main()
    except WriteError as e:  # an output that cannot be written (a full disk, a link in the way): one line
        fail(str(e))
