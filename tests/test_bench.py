import json

from conftest import run_script

TINY_CONFIG = """
dataset = 'shakespeare_char'
batch_size = 2
block_size = 16
n_layer = 1
n_head = 2
n_embd = 32
bias = False
"""


def test_bench_runs_as_a_user_runs_it_and_writes_the_ratios(workdir):
    (workdir / 'config_bench_tiny.py').write_text(TINY_CONFIG)
    proc = run_script(workdir, 'bench_bio.py', '--config=config_bench_tiny.py', '--device=cpu', '--rounds=2',
                      '--act_calls=1', '--sample_repeats=1', '--new_tokens=4', '--out=bench.json', timeout=600)
    report = json.loads((workdir / 'bench.json').read_text())
    assert report['device'].startswith('cpu') and report['dtype'] == 'float32'
    # the activation keeps its (32 x 128) input and its three 128-vectors; GELU keeps the input alone
    assert report['act_saved_bytes_ratio'] == (32 * 128 + 3 * 128) / (32 * 128)
    assert report['act']['input_shape'] == [32, 128]
    for key in ('act_time_ratio_eager', 'act_time_ratio_compiled', 'step_time_ratio_eager', 'step_time_ratio_compiled',
                'step_twin_ratio_eager', 'step_twin_ratio_compiled'):
        assert report[key] > 0 and f'{key} = ' in proc.stdout, key
    assert set(report['step']['time_s']) == {'bio', 'bio_compiled', 'bio_unfused', 'gelu', 'gelu_compiled',
                                            'gelu_twin', 'gelu_twin_compiled'}
    assert report['step']['memory_bytes']['bio'] > 0
    assert report['sample']['block_size_256']['tokens_per_s_cache'] > 0


def test_bench_user_mistakes_are_one_line_errors(workdir):
    for args, message in [(['--config=nope.py'], 'no config file nope.py'),
                          (['--device=cpu', '--dtype=half'], "dtype='half' is not one of")]:
        proc = run_script(workdir, 'bench_bio.py', *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
