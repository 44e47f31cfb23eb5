"""
The analysis scripts run as users run them, their numbers checked against the checkpoints they read;
compare_runs.py end to end.

    python -m pytest tests/test_analysis.py              (-m "not slow": the quick ones only)
"""

import pytest
import json
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor

import matplotlib.image
import numpy as np
import torch

from conftest import REPO, TINY, load, message_lines, run_script, simulated_env
from checkpoints import save_checkpoint
from model_bio import GPT, GPTConfig

ANALYSIS = os.path.join(REPO, 'analysis')
MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, use_bio_mlp=True)


def assert_png(path):
    assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n', path
    assert matplotlib.image.imread(path).shape[0] > 0


def write_model(path, seed=0, omega_shift=0.0, layer1_moved=0, **overrides):
    """A checkpoint of a random model whose omegas spread over every band (a v2/v1 event layer's over fewer, so
    that its report cannot pass for the first activation's); layer1_moved > 0 makes layer 1 a copy of layer 0
    with that many omegas moved far out of layer 0's range."""
    torch.manual_seed(seed)
    args = dict(MODEL, **overrides)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for block in model.transformer.h:
            if args['use_bio_mlp']:
                omega = block.mlp.activation.omega  # spread over every band, negative values included
                omega.copy_(torch.linspace(-0.5, 4.0, len(omega))[torch.randperm(len(omega))] + omega_shift)
            if hasattr(block.mlp, 'event'):
                omega = block.mlp.event.activation.omega
                omega.copy_(torch.linspace(0.0, 2.0, len(omega))[torch.randperm(len(omega))] - omega_shift)
        if layer1_moved:
            layer0, layer1 = (block.mlp.activation.omega for block in model.transformer.h[:2])
            layer1.copy_(layer0)
            layer1[:layer1_moved] += 10.0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint({'model': model.state_dict(), 'model_args': args, 'iter_num': 0, 'best_val_loss': 1.0,
                     'config': {}, 'format_version': 1}, str(path))
    return model.state_dict()


def layers_of(state, name, n_layer=2):
    """A parameter of every block's MLP (e.g. 'event.activation.omega'), concatenated, as float64 numpy."""
    return torch.cat([state[f'transformer.h.{i}.mlp.{name}'] for i in range(n_layer)]).double().numpy()


def assert_stats_match(stats, values):
    for stat, expected in (('mean', values.mean()), ('std', values.std()), ('min', values.min()),
                           ('max', values.max()), ('share_abs_below_0.1', np.mean(np.abs(values) < 0.1))):
        assert math.isclose(stats[stat], expected, rel_tol=1e-6, abs_tol=1e-9), stat


def assert_bands_match(bands, omega):
    edges = {'delta': (0, 0.4), 'theta': (0.4, 0.8), 'alpha': (0.8, 1.2), 'beta': (1.2, 1.8), 'gamma': (1.8, 3.0),
             'other': (3.0, np.inf)}
    omega = np.abs(omega)
    for band, (lo, hi) in edges.items():
        assert math.isclose(bands[band], np.mean((omega >= lo) & (omega < hi)), abs_tol=1e-12), band
    assert math.isclose(sum(bands.values()), 1.0)


@pytest.mark.slow
def test_analyze_wiggle_numbers_match_the_state_dict(tmp_path):
    state = write_model(tmp_path / 'a' / 'ckpt.pt', use_sparse_gate=True)
    shifted = write_model(tmp_path / 'b' / 'ckpt.pt', omega_shift=0.05, use_sparse_gate=True)
    run_script(tmp_path, os.path.join(ANALYSIS, 'analyze_wiggle.py'), 'a/ckpt.pt', '--compare', 'b/ckpt.pt',
               '--out_dir', 'out', fresh=True)
    stats = json.loads((tmp_path / 'out' / 'wiggle_stats.json').read_text())
    assert stats['n_neurons'] == 2 * 4 * 32 and list(stats['activations']) == ['mlp.activation']
    activation = stats['activations']['mlp.activation']
    for name in ('omega', 'phi', 'baseline', 'gate_weight'):
        key = 'activation' if name in ('omega', 'phi', 'baseline') else 'sparse_gate'
        assert_stats_match(activation[name], layers_of(state, f'{key}.{name}'))
    layer0 = state['transformer.h.0.mlp.activation.omega'].double().numpy()
    assert math.isclose(activation['omega']['per_layer'][0]['mean'], layer0.mean(), rel_tol=1e-6)
    delta = np.abs(layers_of(shifted, 'activation.omega') - layers_of(state, 'activation.omega'))
    compared = stats['compare']['activations']['mlp.activation']
    assert math.isclose(compared['omega']['mean_abs_delta'], delta.mean(), rel_tol=1e-5)
    assert compared['phi']['max_abs_delta'] == 0.0
    for png in ('wiggle_hist.png', 'wiggle_scatter.png', 'wiggle_layers.png', 'wiggle_compare.png'):
        assert_png(tmp_path / 'out' / png)


@pytest.mark.slow
def test_a_v2_model_s_two_oscillating_activations_are_each_reported(tmp_path):
    # v2's MLP oscillates twice: after c_fc (mlp.activation) and in its event layer (mlp.event.activation)
    state = write_model(tmp_path / 'a' / 'ckpt.pt', bio_variant='v2')
    shifted = write_model(tmp_path / 'b' / 'ckpt.pt', omega_shift=0.05, bio_variant='v2')
    scripts = [('analyze_wiggle.py', 'a/ckpt.pt', '--compare', 'b/ckpt.pt', '--out_dir', 'wiggle'),
               ('analyze_brainwaves.py', 'a/ckpt.pt', '--out_dir', 'waves')]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda args: run_script(tmp_path, os.path.join(ANALYSIS, args[0]), *args[1:]), scripts))
    stats = json.loads((tmp_path / 'wiggle' / 'wiggle_stats.json').read_text())
    assert list(stats['activations']) == ['mlp.activation', 'mlp.event.activation']
    assert stats['n_neurons'] == 2 * (2 * 4 * 32)
    for site in stats['activations']:
        for name in ('omega', 'phi', 'baseline'):
            assert_stats_match(stats['activations'][site][name], layers_of(state, f'{site[4:]}.{name}'))
    # the event layer's omegas moved the other way: each activation is compared with its own
    for site, sign in (('mlp.activation', 1), ('mlp.event.activation', -1)):
        delta = layers_of(shifted, f'{site[4:]}.omega') - layers_of(state, f'{site[4:]}.omega')
        assert np.allclose(delta * sign, 0.05, atol=1e-6)
        assert math.isclose(stats['compare']['activations'][site]['omega']['mean_abs_delta'], np.abs(delta).mean(),
                            rel_tol=1e-5)
    waves = json.loads((tmp_path / 'waves' / 'brainwaves.json').read_text())
    assert list(waves['activations']) == ['mlp.activation', 'mlp.event.activation']
    for site, report in waves['activations'].items():
        assert_bands_match(report['bands'], layers_of(state, f'{site[4:]}.omega'))
    assert waves['activations']['mlp.event.activation']['bands']['other'] == 0.0  # its omegas stop at 2
    for png in ('wiggle/wiggle_hist.png', 'wiggle/wiggle_compare.png', 'waves/brainwaves_bands.png',
                'waves/brainwaves_similarity.png'):
        assert_png(tmp_path / png)


@pytest.mark.slow
def test_analysis_of_a_gelu_model_is_a_one_line_error(tmp_path):
    write_model(tmp_path / 'g' / 'ckpt.pt', use_bio_mlp=False)
    for script in ('analyze_wiggle.py', 'analyze_brainwaves.py'):
        proc = run_script(tmp_path, os.path.join(ANALYSIS, script), 'g/ckpt.pt', check=False)
        assert proc.returncode != 0 and 'Traceback' not in proc.stderr
        assert message_lines(proc.stderr) == ['error: g/ckpt.pt has no oscillating neurons (its MLP is mlp=gelu)']


@pytest.mark.slow
def test_brainwaves_band_shares_match_the_state_dict(tmp_path):
    state = write_model(tmp_path / 'a' / 'ckpt.pt', layer1_moved=32)  # a quarter of layer 1's 128 neurons
    run_script(tmp_path, os.path.join(ANALYSIS, 'analyze_brainwaves.py'), 'a/ckpt.pt', '--out_dir', 'out', fresh=True)
    report = json.loads((tmp_path / 'out' / 'brainwaves.json').read_text())
    assert list(report['activations']) == ['mlp.activation'] and report['n_neurons'] == 2 * 4 * 32
    activation = report['activations']['mlp.activation']
    assert_bands_match(activation['bands'], layers_of(state, 'activation.omega'))
    assert all(s > 0 for s in activation['bands'].values())
    # the layers share 3/4 of their omegas exactly; the moved quarter lies where layer 0 has none
    assert np.allclose(activation['layer_similarity'], [[1.0, 0.75], [0.75, 1.0]], atol=1e-12)
    for png in ('brainwaves_bands.png', 'brainwaves_spectrum.png', 'brainwaves_waveforms.png',
                'brainwaves_similarity.png'):
        assert_png(tmp_path / 'out' / png)


def test_a_curve_is_read_between_its_evaluations_and_not_past_its_end():
    import sys
    sys.path.insert(0, os.path.join(REPO, 'analysis'))
    from compare_runs import loss_at
    curve = [(0.0, 4.0), (10.0, 3.0), (30.0, 2.0)]
    assert [loss_at(curve, spent) for spent in (0.0, 5.0, 10.0, 20.0, 30.0)] == [4.0, 3.5, 3.0, 2.5, 2.0]
    assert loss_at(curve, 30.5) is None  # past its end: not measured


@pytest.mark.slow
def test_compare_runs_trains_both_arms_and_reports_paired_differences(workdir):
    (workdir / 'config_tiny.py').write_text('max_iters = 4\neval_interval = 2\n')
    settings = [arg[2:] for arg in TINY]
    run_script(workdir, 'analysis/compare_runs.py', '--config', 'config_tiny.py', '--seeds', '2',
               '--set', *settings, '--runs_dir', 'runs')
    assert sorted(p.name for p in (workdir / 'runs').iterdir() if p.is_dir()) == [
        'bio-seed1337', 'bio-seed1338', 'gelu-seed1337', 'gelu-seed1338']
    report = json.loads((workdir / 'runs' / 'compare.json').read_text())
    finals = {}
    for name, row in report['runs'].items():
        evals = [json.loads(line) for line in (workdir / 'runs' / name / 'log.jsonl').read_text().splitlines()]
        vals = [e['val_loss'] for e in evals if 'val_loss' in e]
        assert row['best_val_loss'] == min(vals) and row['final_val_loss'] == vals[-1] and row['final_iter'] == 4
        finals[name] = vals[-1]
    diffs = [finals[f'bio-seed{s}'] - finals[f'gelu-seed{s}'] for s in (1337, 1338)]
    paired = report['paired']['bio - gelu']['final_val_loss']
    assert paired['values'] == diffs
    half = 12.706 * statistics.stdev(diffs) / math.sqrt(2)
    assert math.isclose(paired['ci95'][0], statistics.mean(diffs) - half, rel_tol=1e-9)
    assert math.isclose(report['arms']['gelu']['None']['final_val_loss']['mean'], statistics.mean(
        [finals['gelu-seed1337'], finals['gelu-seed1338']]), rel_tol=1e-12)
    assert_png(workdir / 'runs' / 'compare_curves.png')
    # a second call trains nothing, and --tabulate reports the same runs
    again = run_script(workdir, 'analysis/compare_runs.py', '--config', 'config_tiny.py', '--seeds', '2',
                       '--set', *settings, '--runs_dir', 'runs')
    assert again.stdout.count('done already') == 4
    # compute-matched: bio's val loss at GELU's training FLOPs, between bio's last two evaluations (a bio step
    # costs more: omega, phi, baseline), against GELU's final; the same by the steps' wall clock
    expected = []
    for seed in (1337, 1338):
        curves = {arm: [(e['flops'], e['val_loss']) for e in map(json.loads, (workdir / 'runs' / f'{arm}-seed{seed}' /
                        'log.jsonl').read_text().splitlines()) if 'val_loss' in e] for arm in ('bio', 'gelu')}
        (a, loss_a), (b, loss_b), budget = *curves['bio'][-2:], curves['gelu'][-1][0]
        assert a < budget < b
        expected.append(loss_a + (loss_b - loss_a) * (budget - a) / (b - a) - curves['gelu'][-1][1])
    matched = report['compute_matched']['bio - gelu']
    assert matched['flops']['values'] == pytest.approx(expected, rel=1e-12) and len(matched['train_s']['values']) == 2
    assert 'compute-matched bio - gelu, val loss at gelu\'s training FLOPs: ' in again.stdout
    # then, side by side (each leaves 'runs' as it was): --tabulate; asked with other settings (a finished run is
    # refused and left as it was); leaving out a setting the run was trained with (that asks for train_bio.py's
    # default: also other settings); the same folder named another way (the same run); and a run that stops half
    # way (out of memory at iteration 3, after its checkpoint of iter 2), in a folder of its own
    before = (workdir / 'runs' / 'bio-seed1337' / 'ckpt.pt').read_bytes()
    one_seed = ['analysis/compare_runs.py', '--config', 'config_tiny.py', '--seeds', '1', '--set']
    without = [kv for kv in settings if not kv.startswith('warmup_iters=')]
    calls = [(['analysis/compare_runs.py', '--tabulate', '--runs_dir', 'runs', '--out_dir', 't'], None),
             ([*one_seed, *settings, 'learning_rate=0.02', '--runs_dir', 'runs'], None),
             ([*one_seed, *without, '--runs_dir', 'runs'], None),
             ([*one_seed, *settings, '--runs_dir', os.path.join('.', 'runs', '')], None),
             ([*one_seed, *settings, '--runs_dir', 'broken'], simulated_env(SIMULATED_OOM_AFTER=12))]
    with ThreadPoolExecutor(2) as pool:
        tabulated, refused, refused_default, same, broken = pool.map(
            lambda call: run_script(workdir, *call[0], check=False, env=call[1]), calls)
    assert tabulated.returncode == 0, tabulated.stderr
    assert json.loads((workdir / 't' / 'compare.json').read_text())['runs'] == report['runs']
    assert refused.returncode == 2 and message_lines(refused.stderr) == [
        'error: runs/bio-seed1337 holds a run with other settings (learning_rate 0.01 -> 0.02); pass another '
        '--runs_dir, or move that folder away']
    assert refused_default.returncode == 2 and '(warmup_iters 2 -> 2000)' in refused_default.stderr
    assert (workdir / 'runs' / 'bio-seed1337' / 'ckpt.pt').read_bytes() == before
    assert same.returncode == 0 and same.stdout.count('done already') == 2
    assert broken.returncode == 2 and 'broken/bio-seed1337 failed' in broken.stderr
    # the broken run goes on from its checkpoint, to the same result as the unbroken run
    resumed = run_script(workdir, *one_seed, *settings, '--runs_dir', 'broken')
    assert 'broken/bio-seed1337: resuming at iter 2' in resumed.stdout
    rows = json.loads((workdir / 'broken' / 'compare.json').read_text())['runs']
    assert rows == {name: row for name, row in report['runs'].items() if name.endswith('seed1337')}


@pytest.mark.slow
def test_compare_runs_sweeps_learning_rates_and_judges_each_arm_at_its_best(workdir):
    # arms from the command line (here two optimizers); each swept over two rates on two seeds (--grid_seeds), a
    # third seed at each arm's best rate on those
    (workdir / 'config_tiny.py').write_text('max_iters = 4\neval_interval = 2\nuse_bio_mlp = False\n')
    settings = [arg[2:] for arg in TINY] + ['min_lr=0.001', 'muon_learning_rate=0.005']
    proc = run_script(workdir, 'analysis/compare_runs.py', '--config', 'config_tiny.py', '--seeds', '3',
                      '--grid_seeds', '2', '--set', *settings, '--runs_dir', 'runs', '--lrs', '0.01', '0.03',
                      '--arms', 'muon:optimizer=muon', 'adamw:optimizer=adamw')
    names = sorted(p.name for p in (workdir / 'runs').iterdir() if p.is_dir())
    # each arm's grid, extended 3x beyond its best while that lies at an edge (a grid of two always needs it once)
    rates = {arm: sorted({n.split('-lr')[1].split('-')[0] for n in names if n.startswith(arm + '-')}, key=float)
             for arm in ('muon', 'adamw')}
    for arm in rates:
        assert {'0.01', '0.03'} < set(rates[arm]) and f'{arm}: its best rate' in proc.stdout
        assert all(f'{arm}-lr{lr}-seed{seed}' in names for lr in rates[arm] for seed in (1337, 1338))
        for low, high in zip(rates[arm], rates[arm][1:]):
            assert math.isclose(float(high) / float(low), 3, rel_tol=0.02) or (low, high) == ('0.01', '0.03')
    assert len([n for n in names if n.endswith('seed1339')]) == 2  # the third seed at each arm's best alone
    # the config's other rates follow learning_rate: 0.03 is 3x the config's 0.01
    config = load(workdir / 'runs' / 'muon-lr0.03-seed1337' / 'ckpt.pt')['config']
    assert (config['optimizer'], config['learning_rate']) == ('muon', 0.03)
    assert math.isclose(config['min_lr'], 0.003) and math.isclose(config['muon_learning_rate'], 0.015)
    finals = {}
    for name in names:
        evals = [json.loads(line) for line in (workdir / 'runs' / name / 'log.jsonl').read_text().splitlines()]
        finals[name] = [(e['iter'], e['val_loss']) for e in evals if 'val_loss' in e]
    report = json.loads((workdir / 'runs' / 'compare.json').read_text())
    best = {}
    for arm in ('muon', 'adamw'):
        means = {lr: statistics.mean(finals[f'{arm}-lr{lr}-seed{s}'][-1][1] for s in (1337, 1338)) for lr in rates[arm]}
        best[arm] = min(means, key=means.get)
        # interior to its grid, or marked as at its edge once the extensions ran out
        at_edge = best[arm] in (rates[arm][0], rates[arm][-1])
        assert report['best_lr_at_edge'][arm] == at_edge and (not at_edge or len(rates[arm]) == 2 + 3)
        # the third seed ran at the grid's best alone, and that rate is judged, now over 3 seeds
        assert f'{arm}-lr{best[arm]}-seed1339' in names and report['best_lr'][arm] == float(best[arm])
        means[best[arm]] = statistics.mean(finals[f'{arm}-lr{best[arm]}-seed{s}'][-1][1] for s in (1337, 1338, 1339))
        for lr, mean in means.items():
            assert math.isclose(report['arms'][arm][str(float(lr))]['final_val_loss']['mean'], mean, rel_tol=1e-12)
    # the paired difference is taken between each arm's best rate, seed by seed; adamw (last) is the baseline
    seeds = (1337, 1338, 1339)
    diffs = [finals[f'muon-lr{best["muon"]}-seed{s}'][-1][1] - finals[f'adamw-lr{best["adamw"]}-seed{s}'][-1][1]
             for s in seeds]
    assert report['paired']['muon - adamw']['final_val_loss']['values'] == diffs
    target = statistics.mean(finals[f'adamw-lr{best["adamw"]}-seed{s}'][-1][1] for s in seeds)
    for arm in ('muon', 'adamw'):
        curve = [(i, statistics.mean(finals[f'{arm}-lr{best[arm]}-seed{s}'][k][1] for s in seeds))
                 for k, (i, _) in enumerate(finals[f'{arm}-lr{best[arm]}-seed1337'])]
        assert report['iters_to_baseline'][arm] == {
            'target': target, 'iters': next((i for i, v in curve if v <= target), None)}
    assert report['iters_to_baseline']['adamw']['iters'] is not None  # the baseline reaches its own final loss, by the end
    assert 'picked on the same val split' in proc.stdout and 'paired muon - adamw, final_val_loss' in proc.stdout
    assert_png(workdir / 'runs' / 'compare_lr.png')
    assert_png(workdir / 'runs' / 'compare_curves.png')
    # arms that cannot be told apart, or settings train_bio.py does not have, stop before any training
    for arms, message in ((['a-b:seed=1', 'c:seed=2'], "error: arm 'a-b:seed=1': give each arm its own name"),
                          (['a:optimiser=muon', 'b:optimizer=adamw'], "error: unknown config key 'optimiser'")):
        proc = run_script(workdir, 'analysis/compare_runs.py', '--config', 'config_tiny.py', '--set', *settings,
                          '--runs_dir', 'mistakes', '--arms', *arms, check=False)
        assert proc.returncode == 2 and len(message_lines(proc.stderr)) == 1, proc.stderr
        assert message_lines(proc.stderr)[0].startswith(message), proc.stderr
    assert not (workdir / 'mistakes').exists()
    proc = run_script(workdir, 'analysis/compare_runs.py', '--config', 'config_tiny.py', '--grid_seeds', '1',
                      '--runs_dir', 'mistakes', check=False)
    assert proc.returncode == 2 and message_lines(proc.stderr) == [
        'error: --grid_seeds sweeps the --lrs on the first seeds; give --lrs too']


@pytest.mark.slow
def test_a_learning_rate_that_diverges_counts_as_infinite_and_the_sweep_goes_on(workdir):
    (workdir / 'config_tiny.py').write_text('max_iters = 4\neval_interval = 2\nuse_bio_mlp = False\n')
    sweep = ['analysis/compare_runs.py', '--config', 'config_tiny.py', '--seeds', '1', '--lrs', '1e+30', '0.01',
             '--set', *[arg[2:] for arg in TINY], 'max_skipped_steps=2', '--runs_dir', 'runs',
             '--arms', 'decay:weight_decay=0.1', 'plain:weight_decay=0.0']
    proc = run_script(workdir, *sweep)
    assert proc.stdout.count('diverged (') == 2  # both arms at 1e30, which train_bio.py stopped with one line
    assert (workdir / 'runs' / 'decay-lr1e+30-seed1337' / 'diverged.txt').read_text().startswith('error: ')
    report = json.loads((workdir / 'runs' / 'compare.json').read_text())
    assert report['runs']['plain-lr1e+30-seed1337']['diverged'] and report['runs']['plain-lr1e+30-seed1337'][
        'final_val_loss'] == math.inf
    # the sweep went on to 0.01, best of the two, and on below it until the grid bracketed the best
    assert 'decay: its best rate 0.01 is at the edge of its grid; adding 0.00333' in proc.stdout
    for arm in ('decay', 'plain'):
        rates = sorted(float(lr) for lr in report['arms'][arm])
        assert report['best_lr_at_edge'][arm] is (report['best_lr'][arm] in (rates[0], rates[-1]))
        assert report['best_lr'][arm] != 1e30 and len(rates) >= 3
    assert report['arms']['decay']['1e+30']['final_val_loss']['mean'] == math.inf
    again = run_script(workdir, *sweep, fresh=True)
    runs = len(report['runs'])
    assert again.stdout.count('diverged already') == 2 and again.stdout.count('done already') == runs - 2

