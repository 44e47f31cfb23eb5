"""
bench_bio.py run as users run it, on a tiny config.

    python -m pytest tests/test_bench.py              (-m "not slow": the quick ones only)
"""

import pytest
import json
import os
import re
import statistics

from conftest import message_lines, run_script
from model_bio import GPT, GPTConfig
from optimizers import OPTIMIZERS

TINY_CONFIG = """
dataset = 'shakespeare_char'
batch_size = 2
block_size = 16
n_layer = 1
n_head = 2
n_embd = 32
bias = False
"""


@pytest.mark.slow
def test_bench_runs_as_a_user_runs_it_and_writes_the_ratios(workdir):
    (workdir / 'config_bench_tiny.py').write_text(TINY_CONFIG)
    proc = run_script(workdir, 'bench_bio.py', 'config_bench_tiny.py', '--device=cpu', '--rounds=2',
                      '--act_calls=1', '--sample_repeats=1', '--new_tokens=4', '--moe_sizes=2', '--bench_out=bench.json',
                      '--synapse_chunk=5', timeout=600, fresh=True)
    report = json.loads((workdir / 'bench.json').read_text())
    assert report['device'].startswith('cpu') and report['dtype'] == 'float32'
    # the activation keeps its (32 x 128) input and its three 128-vectors; GELU keeps the input alone
    assert report['act_saved_bytes_ratio'] == (32 * 128 + 3 * 128) / (32 * 128)
    assert report['act']['input_shape'] == [32, 128]
    for key in ('act_time_ratio_eager', 'act_time_ratio_compiled', 'step_time_ratio_eager', 'step_time_ratio_compiled',
                'step_twin_ratio_eager', 'step_twin_ratio_compiled'):
        assert report[key] > 0 and f'{key} = ' in proc.stdout, key
    step = report['step']
    assert set(step['time_s']) == {'bio', 'bio_compiled', 'bio_unfused', 'gelu', 'gelu_compiled', 'gelu_twin',
                                   'gelu_twin_compiled', 'bio_moe2', 'bio_moe2_compiled'}
    assert step['memory_bytes']['bio'] > 0
    # the bio MLP as a static mixture of 2 experts (compiled too), against the dense bio row; backward keeps the routing
    for mode in ('eager', 'compiled'):
        suffix = '_compiled' if mode == 'compiled' else ''
        assert report[f'step_time_ratio_{mode}_moe2'] == step['time_s'][f'bio_moe2{suffix}'] / step['time_s'][f'bio{suffix}']
    assert report['step_memory_ratio_moe2'] == step['memory_bytes']['bio_moe2'] / step['memory_bytes']['bio'] > 1
    assert report['sample']['block_size_256']['tokens_per_s_cache'] > 0
    # presynaptic depression in chunks of 5 (16 tokens: 4 chunks) keeps q, k, v, its output and a row per chunk
    # for backward, as much as SDPA keeps and a little more; the fast weights' scratchpad, chunked too
    attn = report['attn']
    assert attn['memory_bytes']['sdpa'] < attn['memory_bytes']['presynaptic'] < 1.5 * attn['memory_bytes']['sdpa']
    for row in ('presynaptic', 'fast_weights'):
        assert report[f'attn_time_ratio_{row}'] == attn['time_s'][row] / attn['time_s']['sdpa']
        assert report[f'attn_memory_ratio_{row}'] == attn['memory_bytes'][row] / attn['memory_bytes']['sdpa']
        assert f'attn_memory_ratio_{row} = ' in proc.stdout and re.search(rf'{row} .*x SDPA', proc.stdout)
    assert 'chunks of 5' in proc.stdout
    # each optimizer's step, side by side; AdamW keeps two float32 moments per weight and a step count per tensor
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=False, use_bio_mlp=True,
                          use_rmsnorm=True, use_rope=True))  # train_bio.py's defaults
    params = list(model.parameters())
    optim = report['optim']
    assert set(optim['time_s']) | set(optim['not_installed']) == set(OPTIMIZERS)
    assert optim['state_bytes']['adamw'] == sum(8 * p.numel() + 4 for p in params)
    assert optim['state_bytes']['muon'] < optim['state_bytes']['adamw']  # one momentum for the block matrices
    assert 0 < optim['state_bytes']['adafactor'] < sum(4 * p.numel() for p in params)  # factored second moments
    if 'lion' in optim['state_bytes']:
        assert optim['state_bytes']['lion'] == sum(4 * p.numel() for p in params)  # one momentum, nothing else
    assert all(t > 0 for t in optim['time_s'].values()) and re.search(r'muon .* ms .* MB', proc.stdout)


@pytest.mark.slow
def test_each_bio_variant_s_step_is_timed_beside_gelu(workdir):
    # the config's own variant is the bio row; each other one listed gets its row, against the same GELU rows
    (workdir / 'config_bench_tiny.py').write_text(TINY_CONFIG + "bio_variant = 'v2'\n")
    (workdir / 'theirs.txt').write_text('theirs\n')
    os.symlink(workdir / 'theirs.txt', workdir / 'bench.json')  # planted: replaced, never written through
    proc = run_script(workdir, 'bench_bio.py', 'config_bench_tiny.py', '--device=cpu', '--part=step', '--rounds=1',
                      '--bench_compiled=False', '--bio_variants=v3,v2,v1', '--synapses=presynaptic,fast_weights',
                      '--mlp_kinds=swiglu,relu2,bio_glu', '--bench_out=bench.json', timeout=600)
    assert (workdir / 'theirs.txt').read_text() == 'theirs\n' and not os.path.islink(workdir / 'bench.json')
    report = json.loads((workdir / 'bench.json').read_text())
    step = report['step']
    assert step['bio_variant'] == 'v2' and 'bio is bio_variant v2' in proc.stdout
    assert set(step['time_s']) == {'bio', 'bio_unfused', 'bio_v3', 'bio_v1', 'bio_presynaptic', 'bio_fast_weights',
                                   'gelu', 'gelu_twin', 'swiglu', 'relu2', 'bio_glu'}
    # each mechanism on the config's bio model (v2 here), against it
    for mechanism in ('presynaptic', 'fast_weights'):
        row = f'bio_{mechanism}'
        assert step['memory_bytes'][row] > step['memory_bytes']['bio']
        assert report[f'step_time_ratio_eager_{mechanism}'] == step['time_s'][row] / step['time_s']['bio']
        assert report[f'step_memory_ratio_{mechanism}'] == step['memory_bytes'][row] / step['memory_bytes']['bio']
    memory = step['memory_bytes']
    # what backward keeps grows along the lineage: v1's dendrites and v2's event layer above v3's one activation
    assert memory['bio_v1'] > memory['bio'] > memory['bio_v3'] > memory['gelu'] > 0
    for v, row in (('v3', 'bio_v3'), ('v1', 'bio_v1')):
        assert report[f'step_time_ratio_eager_{v}'] == step['time_s'][row] / step['time_s']['gelu']
        assert report[f'step_memory_ratio_{v}'] == memory[row] / memory['gelu']
        assert f'step_memory_ratio_{v} = ' in proc.stdout and re.search(rf'{row} .* ms .* MiB kept', proc.stdout)
    assert report['step_memory_ratio'] == memory['bio'] / memory['gelu']
    # each added MLP against the same GELU rows
    for kind in ('swiglu', 'relu2', 'bio_glu'):
        assert report[f'step_time_ratio_eager_{kind}'] == step['time_s'][kind] / step['time_s']['gelu']
        assert report[f'step_memory_ratio_{kind}'] == memory[kind] / memory['gelu'] and memory[kind] > 0
        assert re.search(rf'{kind} .* ms .* MiB kept', proc.stdout)


@pytest.mark.slow
def test_whole_runs_are_timed_as_processes_of_the_config(workdir):
    # whole runs of train_bio.py with the config and the overrides that are not the bench's own
    # the config also holds a bench setting (which train_bio.py would refuse) and the sparse gate
    # (which the GELU arm must drop)
    (workdir / 'config_bench_tiny.py').write_text(TINY_CONFIG.replace('shakespeare_char', 'tiny')
                                                  + 'whole_pairs = 2\nuse_bio_mlp = True\nuse_sparse_gate = True\n')
    proc = run_script(workdir, 'bench_bio.py', 'config_bench_tiny.py', '--device=cpu', '--part=whole',
                      '--whole_iters=3', '--eval_iters=1', '--bench_out=whole.json', timeout=600)
    report = json.loads((workdir / 'whole.json').read_text())['whole']
    assert len(report['time_s']['bio']) == len(report['time_s']['gelu']) == 2 and min(report['time_s']['bio']) > 0
    assert report['ratios'] == [b / g for b, g in zip(report['time_s']['bio'], report['time_s']['gelu'])]
    assert report['whole_run_time_ratio'] == statistics.median(report['ratios'])
    assert re.search(r'whole runs of train_bio.py .*--eval_iters=1 .*--dataset=tiny .*--batch_size=2 .*: 3 iterations, 2 pairs',
                     proc.stdout), proc.stdout
    assert not [p for p in os.listdir(workdir) if p.startswith('out')]  # the runs wrote into a scratch folder


@pytest.mark.slow
def test_bench_user_mistakes_are_one_line_errors(workdir):
    for args, message in [(['nope.py'], "config file 'nope.py' not found"),
                          (['--device=cpu', '--dtype=half'], "dtype='half' is not one of"),
                          (['--part=everything'], "part = 'everything' is not allowed: it must be one of steps,"),
                          (['--synapses=dendrites'], "synapses='dendrites' must list mechanisms out of presynaptic"),
                          (['--mlp_kinds=swiglu,gelu'], "mlp_kinds='swiglu,gelu' must list MLPs out of swiglu, relu2, bio_glu"),
                          (['--moe_sizes=4,many'], "moe_sizes='4,many' must list numbers of experts, e.g. '4,8'"),
                          (['--moe_sizes=1'], "moe_sizes='1': use_moe=True needs moe_top_k <= moe_min_experts")]:
        proc = run_script(workdir, 'bench_bio.py', *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(message_lines(proc.stderr)) == 1, proc.stderr
