"""
Speed and memory of WiggleGPT against GELU, measured side by side in one run: each round runs
every variant once, in a new random order (so drifts in machine load hit them alike), and
medians over the rounds are reported.

    python bench_bio.py --config=config_shakespeare_char_cpu.py --out=bench.json
    python bench_bio.py --config=config_gpt2_bio_3070.py --dtype=bfloat16 --batch_size=8   (a GPU)

- act: the activation alone on a (batch_size * block_size, 4 * n_embd) input, forward + backward
  time and bytes kept for backward, for each implementation of model_bio.py and for GELU.
- step: a whole training step (forward, backward, AdamW) of the config's model, bio vs GELU,
  eager and compiled: tokens/s, and peak memory on CUDA (bytes kept for backward on CPU). The
  GELU step is timed twice, under two names (gelu and gelu_twin): twin / GELU shows how far
  from 1 a ratio strays by chance on this machine.
- sample: generation tokens/s with and without the KV cache, for the model shape of
  config_shakespeare_char_bio.py (6 layers, 6 heads, 384 wide), 500 new tokens from a 1-token
  prompt, with a context that holds them all and with that config's block_size of 256, where
  every step past 256 tokens must recompute the whole window.
The ratios in the JSON (bio / GELU; below 1 is faster or leaner) are act_saved_bytes_ratio,
act_time_ratio_eager, step_time_ratio_eager and step_time_ratio_compiled, with
step_twin_ratio_eager and step_twin_ratio_compiled beside them.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import devices
import model_bio
from model_bio import GPT, GPTConfig, generate_tokens

MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'use_rmsnorm', 'use_rope', 'use_sparse_gate')


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


def saved_bytes(fn):
    """Bytes autograd keeps for backward while fn runs, each storage counted once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def with_impl(impl, fn):
    """fn run with model_bio.OSCILLATION_IMPL set to impl."""
    def run():
        previous, model_bio.OSCILLATION_IMPL = model_bio.OSCILLATION_IMPL, impl
        try:
            return fn()
        finally:
            model_bio.OSCILLATION_IMPL = previous
    return run


def bench_activation(cfg, args, device, autocast):
    n = 4 * cfg['n_embd']
    torch.manual_seed(0)
    x = torch.randn(cfg['batch_size'] * cfg['block_size'], n, device=device, requires_grad=True)
    act = model_bio.OscillatingActivation(n).to(device)
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
    if args.compile:
        variants['gelu_compiled'] = forward_backward(torch.compile(F.gelu))
        variants['bio_compiled'] = forward_backward(torch.compile(act))
    for fn in variants.values():  # warm up (and compile) before timing
        fn()
    times = median_times(variants, device, args.rounds, args.act_calls)
    memory = {name: saved_bytes(fn) for name, fn in variants.items() if 'compiled' not in name}
    eager_impl = 'function' if model_bio.fused_kernels.get('forward') is False else 'fused'  # what 'auto' trains with
    print(f"\nactivation alone, input {tuple(x.shape)}: forward + backward")
    for name in variants:
        kept = f"{memory[name] / 2**20:8.2f} MiB kept" if name in memory else ''
        print(f"  {name:15s} {times[name] * 1e3:8.3f} ms  {times[name] / times['gelu']:5.2f}x GELU  {kept}")
    results = {'input_shape': list(x.shape), 'time_s': times, 'saved_bytes': memory,
               'act_saved_bytes_ratio': memory[eager_impl] / memory['gelu'],
               'act_time_ratio_eager': times[eager_impl] / times['gelu'],
               'act_time_ratio_unfused': times['function'] / times['gelu']}
    if args.compile:
        results['act_time_ratio_compiled'] = times['bio_compiled'] / times['gelu_compiled']
    return results


def bench_step(cfg, args, device, autocast, dtype):
    vocab_size = 65 if 'shakespeare_char' in cfg.get('dataset', '') else 50304
    B, T = cfg['batch_size'], cfg['block_size']
    torch.manual_seed(0)
    x = torch.randint(0, vocab_size, (B, T), device=device)
    y = torch.randint(0, vocab_size, (B, T), device=device)
    scaler = devices.grad_scaler(device, dtype)
    models, variants = {}, {}
    for arm, bio in (('bio', True), ('gelu', False)):
        model_args = {k: cfg[k] for k in MODEL_KEYS if k in cfg}
        model_args.update(vocab_size=vocab_size, use_bio_mlp=bio, use_sparse_gate=bio and cfg.get('use_sparse_gate', False))
        model = GPT(GPTConfig(**model_args)).to(device)
        optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
        for compiled in ((False, True) if args.compile else (False,)):
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
        if bio:  # the unfused autograd function, as where nothing compiles (e.g. CUDA on Windows)
            variants['bio_unfused'], models['bio_unfused'] = with_impl('function', variants['bio']), model
    # the GELU step timed a second time under another name: how far twin / GELU strays from 1 is
    # how far any ratio here can stray by chance alone
    for name in [n for n in variants if n.startswith('gelu')]:
        twin = name.replace('gelu', 'gelu_twin')
        variants[twin], models[twin] = variants[name], models[name]
    for fn in variants.values():
        for _ in range(2):
            fn()
    memory = {}
    for name, fn in variants.items():
        if device.type == 'cuda':
            devices.reset_peak_memory(device)
            fn()
            memory[name] = devices.peak_memory(device)[0]
        elif name in ('bio', 'gelu'):
            memory[name] = saved_bytes(lambda: models[name](x, y))
    times = median_times(variants, device, args.rounds, 1)
    peak, _ = devices.peak_flops(device)
    print(f"\ntraining step, {args.config}: batch {B} x {T} tokens, {dtype}")
    results = {'tokens_per_step': B * T, 'time_s': times, 'memory_bytes': memory,
               'memory_kind': 'peak allocated' if device.type == 'cuda' else 'kept for backward', 'mfu': {}}
    for name in variants:
        tokens_per_s = B * T / times[name]
        mfu = models[name].estimate_mfu(tokens_per_s, peak)
        results['mfu'][name] = mfu
        mem = f"{memory[name] / 2**20:9.1f} MiB {results['memory_kind']}" if name in memory else ''
        mfu_text = f"mfu {mfu * 100:5.1f}%" if mfu is not None else ''
        print(f"  {name:18s} {times[name] * 1e3:9.2f} ms  {tokens_per_s:10.0f} tok/s  {mem}  {mfu_text}")
    for mode in ('eager', 'compiled') if args.compile else ('eager',):
        suffix = '_compiled' if mode == 'compiled' else ''
        results[f'step_time_ratio_{mode}'] = times['bio' + suffix] / times['gelu' + suffix]
        results[f'step_twin_ratio_{mode}'] = times['gelu_twin' + suffix] / times['gelu' + suffix]
    return results


def bench_sample(args, device):
    """tokens/s generating args.new_tokens greedy tokens, with and without the KV cache."""
    results = {}
    print(f'\nsampling {args.new_tokens} tokens, 6 layers x 384 (config_shakespeare_char_bio.py)')
    for block_size in (1024, 256):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=block_size, vocab_size=65,
                              use_bio_mlp=True, bias=False)).to(device).eval()
        variants = {use_cache: (lambda use_cache=use_cache: list(generate_tokens(
            model, [0], args.new_tokens, temperature=0, use_cache=use_cache))) for use_cache in (True, False)}
        times = median_times(variants, device, args.sample_repeats, 1)
        cached, uncached = args.new_tokens / times[True], args.new_tokens / times[False]
        results[f'block_size_{block_size}'] = {'tokens_per_s_cache': cached, 'tokens_per_s_no_cache': uncached,
                                               'cache_speedup': cached / uncached}
        print(f'  block_size {block_size:5d}: {cached:8.1f} tok/s with cache, {uncached:8.1f} without, '
              f'{cached / uncached:5.2f}x')
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='config_shakespeare_char_cpu.py', help='model and batch shape')
    parser.add_argument('--only', choices=['act', 'step', 'sample'], default=None, help='one part (default: all)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--dtype', default='auto', help="'auto', 'float32', 'bfloat16' or 'float16'")
    parser.add_argument('--batch_size', type=int, default=0, help="override the config's batch_size")
    parser.add_argument('--compile', type=int, default=1, help='also measure torch.compile (1) or not (0)')
    parser.add_argument('--rounds', type=int, default=40, help='timed rounds, each variant once per round; medians reported')
    parser.add_argument('--act_calls', type=int, default=10,
                        help='calls of the activation alone per variant and round (each takes well under a millisecond)')
    parser.add_argument('--sample_repeats', type=int, default=3)
    parser.add_argument('--new_tokens', type=int, default=500)
    parser.add_argument('--out', default=None, help='write the figures to this JSON file')
    args = parser.parse_args()

    if not os.path.isfile(args.config):
        sys.exit(f'error: no config file {args.config} (pass one of the config_*.py files with --config)')
    cfg = {}
    with open(args.config) as f:
        exec(f.read(), {}, cfg)  # a config file is plain Python assignments
    if args.batch_size:
        cfg['batch_size'] = args.batch_size
    try:
        device = devices.pick_device(args.device)
        dtype = devices.pick_dtype(device, args.dtype)
    except ValueError as e:
        sys.exit(f'error: {e}')
    autocast = devices.autocast(device, dtype)
    name = devices.describe(device)
    report = {'device': name, 'torch': torch.__version__, 'config': args.config, 'dtype': dtype}
    print(f"device: {name}, torch {torch.__version__}, {dtype}")
    if args.only in (None, 'act'):
        report['act'] = bench_activation(cfg, args, device, autocast)
    if args.only in (None, 'step'):
        report['step'] = bench_step(cfg, args, device, autocast, dtype)
    if args.only in (None, 'sample'):
        with torch.no_grad():
            report['sample'] = bench_sample(args, device)
    for part in ('act', 'step'):
        for key, value in report.get(part, {}).items():
            if key.endswith('_ratio') or '_ratio_' in key:
                report[key] = value
    print('\n' + '\n'.join(f'{k} = {v:.3f}' for k, v in report.items() if '_ratio' in k))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
