"""
Benchmarks, measured side by side in one run (variants interleaved, medians reported):
    python bench_bio.py --only=sample --out=bench.json
- sample: generation tokens/s with and without the KV cache, for the model shape of
  config_shakespeare_char_bio.py (6 layers, 6 heads, 384 wide), 500 new tokens from a 1-token prompt,
  once with a context that holds them all and once with the config's block_size of 256, where
  past 256 tokens every step must recompute the whole window.
"""

import argparse
import json
import statistics
import time

import torch

from model_bio import GPT, GPTConfig, generate_tokens, pick_device


def timed(fn, device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_sample(args, device):
    """tokens/s generating args.new_tokens greedy tokens, with and without the KV cache."""
    results = {}
    for block_size in (1024, 256):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=block_size, vocab_size=65,
                              use_bio_mlp=True, bias=False)).to(device).eval()
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for use_cache in (True, False):  # interleaved, so drifts in machine load hit both alike
                times[use_cache].append(timed(lambda: list(generate_tokens(
                    model, [0], args.new_tokens, temperature=0, use_cache=use_cache)), device))
        cached = args.new_tokens / statistics.median(times[True])
        uncached = args.new_tokens / statistics.median(times[False])
        results[f'block_size_{block_size}'] = {'tokens_per_s_cache': cached, 'tokens_per_s_no_cache': uncached,
                                               'cache_speedup': cached / uncached}
        print(f'sample  block_size {block_size:5d}: {cached:8.1f} tok/s with cache, {uncached:8.1f} without, '
              f'{cached / uncached:5.2f}x')
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', choices=['sample'], default=None, help='run one benchmark (default: all)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--repeats', type=int, default=3, help='runs per variant; the median is reported')
    parser.add_argument('--new_tokens', type=int, default=500)
    parser.add_argument('--out', default=None, help='write the figures to this JSON file')
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.set_grad_enabled(False)
    report = {'device': torch.cuda.get_device_name(device) if device.startswith('cuda') else device,
              'torch': torch.__version__, 'threads': torch.get_num_threads()}
    print(f"device: {report['device']}, torch {report['torch']}, {report['threads']} threads")
    if args.only in (None, 'sample'):
        report['sample'] = bench_sample(args, device)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
