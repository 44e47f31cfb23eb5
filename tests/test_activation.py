"""
The oscillating activation: each implementation against the plain-ops reference (float64, gradcheck,
half precision), the memory it keeps for backward, and the fused kernel's fallback.

    python -m pytest tests/test_activation.py              (-m "not slow": the quick ones only)
"""

import os

import pytest
import torch

import oscillation
from devices import saved_bytes
from conftest import REPO, message_lines, run_script, simulated_env
from model_bio import GPT, BioMLP, GPTConfig
from oscillation import Oscillate, oscillate, oscillate_reference

N = 8  # hidden neurons


def unfused(x, *args):
    return Oscillate.apply(x, *args, False)


def fused(x, *args):
    return Oscillate.apply(x, *args, True)


def params(dtype=torch.float64, gate=False, seed=0):
    """omega, phi, baseline (and gate_weight, gate_bias) as leaf tensors that want gradients."""
    g = torch.Generator().manual_seed(seed)
    values = [1 + 0.5 * torch.randn(N, generator=g), 0.5 * torch.randn(N, generator=g), 0.1 * torch.randn(N, generator=g)]
    if gate:
        values += [1 + 0.2 * torch.randn(N, generator=g), 0.1 * torch.randn(N, generator=g)]
    return [v.to(dtype).requires_grad_() for v in values]


def grads_of(fn, x, ps, upstream, threshold=0.0):
    x = x.detach().requires_grad_()
    ps = [p.detach().requires_grad_() for p in ps]
    out = fn(x, *ps, *([None, None] if len(ps) == 3 else []), threshold)
    out.backward(upstream)
    return out.detach(), [x.grad] + [p.grad for p in ps]


def test_function_gradcheck_float64():
    x = torch.randn(3, 4, N, dtype=torch.float64, requires_grad=True)
    omega, phi, baseline = params()
    assert torch.autograd.gradcheck(lambda *a: unfused(*a, None, None, 0.0), (x, omega, phi, baseline))


@pytest.mark.slow
@pytest.mark.parametrize('impl', [unfused, fused])
@pytest.mark.parametrize('gate', [False, True])
def test_function_matches_plain_ops_float64(impl, gate):
    x = torch.randn(6, 5, N, dtype=torch.float64) * 2
    ps = params(gate=gate)
    upstream = torch.randn(6, 5, N, dtype=torch.float64)
    ref_out, ref_grads = grads_of(oscillate_reference, x, ps, upstream, threshold=0.25)
    out, grads = grads_of(impl, x, ps, upstream, threshold=0.25)
    if gate:
        assert 0 < (out == 0).sum() < out.numel()  # both sides of the threshold are exercised
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('gate', [False, True])
def test_function_in_half_precision_is_as_accurate_as_plain_ops(dtype, gate):
    """Half-precision activations as autocast hands them over, float32 parameters; truth in float64."""
    x = (torch.randn(256, N) * 2).to(dtype)
    ps = params(torch.float32, gate=gate)
    upstream = torch.randn(256, N).to(dtype)
    true_out, true_grads = grads_of(oscillate_reference, x.double(), [p.double() for p in ps], upstream.double(), 0.25)
    ref_out, ref_grads = grads_of(oscillate_reference, x, ps, upstream, threshold=0.25)
    out, grads = grads_of(unfused, x, ps, upstream, threshold=0.25)
    assert out.dtype == dtype and grads[0].dtype == dtype and all(g.dtype == torch.float32 for g in grads[1:])

    def error(a, b):
        return (a.double() - b).abs().max().item()

    # the function computes in float32 and rounds once to the half dtype: within one of its ulps
    assert error(out, true_out) <= 2 ** -7 * true_out.abs().max().item()
    # gradients: no worse than plain ops (which also round tanh(x) to the half dtype)
    for g, ref, truth in zip(grads, ref_grads, true_grads):
        assert error(g, truth) <= 1.5 * error(ref, truth) + 1e-5 * truth.abs().max().item()


@pytest.mark.parametrize('impl', [unfused, pytest.param(fused, marks=pytest.mark.slow)])  # fused: a compile
def test_function_saves_only_its_input(impl):
    x = torch.randn(256, N, requires_grad=True)
    ps = params(torch.float32, gate=True)
    vectors = 5 * N * 4
    assert saved_bytes(lambda: impl(x, *ps, 0.25)) == x.numel() * 4 + vectors
    assert saved_bytes(lambda: torch.nn.functional.gelu(x)) == x.numel() * 4
    assert saved_bytes(lambda: oscillate_reference(x, *ps, 0.25)) > 4 * x.numel() * 4  # what the function avoids


def model_outputs(impl, monkeypatch, compiled=False):
    monkeypatch.setattr(oscillation, 'OSCILLATION_IMPL', impl)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, use_bio_mlp=True,
                          use_sparse_gate=True))
    idx = torch.randint(0, 50, (2, 16))
    run = torch.compile(model) if compiled else model
    logits, loss = run(idx, idx)
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}, model.read_sparsity()


@pytest.mark.parametrize('impl', ['function', pytest.param('fused', marks=pytest.mark.slow)])
def test_model_is_the_same_whichever_implementation(impl, monkeypatch):
    ref_logits, ref_grads, ref_sparsity = model_outputs('plain', monkeypatch)
    logits, grads, sparsity = model_outputs(impl, monkeypatch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sparsity == ref_sparsity and 0 < sparsity < 1


def test_auto_falls_back_when_the_fused_kernel_cannot_compile(monkeypatch, capsys):
    # a real compile failure: inductor is pointed at a C++ compiler that does not exist, as on a
    # Windows machine without one; nothing may come from the kernel caches instead. (inductor's own
    # config.patch, not monkeypatch: its settings are not plain module attributes and pytest's undo
    # would delete them for the rest of the session)
    import torch._dynamo
    import torch._inductor.config
    settings = (torch._inductor.config.fx_graph_cache, torch._inductor.config.cpp.cxx)
    monkeypatch.setattr(oscillation, 'fused_kernels', {})
    monkeypatch.setattr(oscillation, 'FUSE_MIN_ELEMENTS', 0)  # this small input is fused too
    torch._dynamo.reset()
    x = torch.randn(4, N, requires_grad=True)
    ps = params(torch.float32)
    with torch._inductor.config.patch({'cpp.cxx': ('/nonexistent/c++',), 'fx_graph_cache': False}):
        out = oscillate(x, *ps)
        out.sum().backward()
        assert 'does not compile here' in capsys.readouterr().err
        assert oscillation.fused_kernels['forward'] is False  # and it does not try again
        torch.testing.assert_close(out, oscillate_reference(x, *ps))
        monkeypatch.setattr(oscillation, 'OSCILLATION_IMPL', 'fused')
        monkeypatch.setattr(oscillation, 'fused_kernels', {})
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match='C.. compiler'):  # asked for by name: no quiet fallback
            oscillate(x, *ps)
    torch._dynamo.reset()
    assert (torch._inductor.config.fx_graph_cache, torch._inductor.config.cpp.cxx) == settings


@pytest.fixture
def no_kernels_yet(monkeypatch):
    """As at the start of a run: no fused kernel made or tried yet (monkeypatch puts the module's back)."""
    monkeypatch.setattr(oscillation, 'fused_kernels', {})


def failing_compile(fails_in):
    """A torch.compile that fails where fusing cannot work: in the call itself ('compile', as on a Python
    that Dynamo does not support), or in the first call of the 'forward' or 'backward' kernel."""
    def broken(*args, **kwargs):
        raise RuntimeError('Dynamo is not supported on Python 3.14+')

    def compile(fn, **kwargs):
        if fails_in == 'compile':
            broken()
        return broken if fn is oscillation.OSCILLATE_MATH[fails_in] else fn
    return compile


def bio_mlp_step(impl, monkeypatch):
    """Output and gradients of a training forward+backward of a sparse-gated bio MLP whose activation
    is large enough (FUSE_MIN_ELEMENTS) for 'auto' to fuse."""
    monkeypatch.setattr(oscillation, 'OSCILLATION_IMPL', impl)
    torch.manual_seed(0)
    mlp = BioMLP(GPTConfig(n_embd=32, use_bio_mlp=True, use_sparse_gate=True))
    out = mlp(torch.randn(oscillation.FUSE_MIN_ELEMENTS // (4 * 32), 32))
    out.square().sum().backward()
    return out.detach(), {name: p.grad for name, p in mlp.named_parameters()}


@pytest.mark.parametrize('fails_in', ['compile', 'forward', 'backward'])
def test_auto_falls_back_on_any_failure_to_make_or_first_run_a_kernel(fails_in, no_kernels_yet, monkeypatch, capsys):
    ref_out, ref_grads = bio_mlp_step('function', monkeypatch)
    monkeypatch.setattr(torch, 'compile', failing_compile(fails_in))
    out, grads = bio_mlp_step('auto', monkeypatch)
    assert capsys.readouterr().err == ('note: the fused oscillation kernel does not compile here (RuntimeError: '
                                       'Dynamo is not supported on Python 3.14+); using the unfused one\n')
    assert oscillation.fused_kernels == {'forward': False, 'backward': False}  # and it does not try again
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize('fails_in', ['compile', 'forward', 'backward'])
def test_fused_asked_for_by_name_raises_instead_of_falling_back(fails_in, no_kernels_yet, monkeypatch):
    monkeypatch.setattr(torch, 'compile', failing_compile(fails_in))
    with pytest.raises(RuntimeError, match='Dynamo is not supported'):
        bio_mlp_step('fused', monkeypatch)


def failing_after_first_run(failing, error):
    """A torch.compile whose kernels run the maths, the 'forward' or 'backward' one raising error from
    its second call on (its first, which compiles it, works)."""
    def compile(fn, **kwargs):
        calls = []

        def kernel(*args):
            calls.append(1)
            if fn is oscillation.OSCILLATE_MATH[failing] and len(calls) > 1:
                raise error
            return fn(*args)
        return kernel
    return compile


@pytest.mark.parametrize('failing', ['forward', 'backward'])
def test_an_error_after_the_kernel_has_run_surfaces_as_itself(failing, no_kernels_yet, monkeypatch, capsys):
    # out of memory (or a device fault) once the kernel has worked is not a reason to stop fusing
    error = torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(torch, 'compile', failing_after_first_run(failing, error))
    monkeypatch.setattr(oscillation, 'FUSE_MIN_ELEMENTS', 0)
    x = torch.randn(4, N, requires_grad=True)
    oscillate(x, *params(torch.float32)).sum().backward()  # each kernel's first run works
    kernels = dict(oscillation.fused_kernels)
    with pytest.raises(torch.OutOfMemoryError):
        oscillate(x, *params(torch.float32)).sum().backward()
    assert oscillation.fused_kernels == kernels and all(kernels.values())  # still fusing
    assert capsys.readouterr().err == ''


@pytest.mark.parametrize('failing', ['forward', 'backward'])
def test_auto_falls_back_when_a_recompile_fails_after_the_kernel_has_run(failing, no_kernels_yet, monkeypatch,
                                                                          capsys):
    # Dynamo recompiles a kernel whose guards fail (a new dtype under autocast, requires_grad differing
    # between frozen and trained blocks); inductor failing then (here: no C++ compiler) is torch.compile's
    # failure like one at the first call, not the run's
    import torch._dynamo.exc
    import torch._inductor.exc
    error = torch._dynamo.exc.BackendCompilerFailed(oscillation.OSCILLATE_MATH[failing],
                                                    torch._inductor.exc.InvalidCxxCompiler(), None)
    monkeypatch.setattr(torch, 'compile', failing_after_first_run(failing, error))
    monkeypatch.setattr(oscillation, 'FUSE_MIN_ELEMENTS', 0)
    x = torch.randn(64, N)
    ps = params(torch.float32, gate=True)
    upstream = torch.randn(64, N)
    ref_out, ref_grads = grads_of(unfused, x, ps, upstream, threshold=0.25)
    grads_of(oscillate, x, ps, upstream, threshold=0.25)  # each kernel's first run works
    assert all(oscillation.fused_kernels.values())
    for _ in range(2):  # the failing call falls back, and so do later ones
        out, grads = grads_of(oscillate, x, ps, upstream, threshold=0.25)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=0, atol=0)
    assert oscillation.fused_kernels == {'forward': False, 'backward': False}
    assert capsys.readouterr().err == ("note: the fused oscillation kernel does not compile here "
                                       f"(BackendCompilerFailed: backend='oscillate_{failing}_math' raised:); "
                                       "using the unfused one\n")


@pytest.mark.slow
def test_compiled_model_agrees_with_eager(monkeypatch):
    ref_logits, ref_grads, _ = model_outputs('function', monkeypatch)
    logits, grads, _ = model_outputs('auto', monkeypatch, compiled=True)  # plain ops inside the compiled graph
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_auto_fuses_only_activations_large_enough_to_repay_compiling(monkeypatch):
    called = []

    def recorded(name):
        return lambda *args: called.append(name) or oscillation.OSCILLATE_MATH[name](*args)

    monkeypatch.setattr(oscillation, 'fused_kernels', {name: recorded(name) for name in ('forward', 'backward')})
    rows = oscillation.FUSE_MIN_ELEMENTS // N
    oscillate(torch.randn(rows - 1, N, requires_grad=True), *params(torch.float32)).sum().backward()
    assert called == []  # one row short: run eagerly
    oscillate(torch.randn(rows, N, requires_grad=True), *params(torch.float32)).sum().backward()
    assert called == ['forward', 'backward']
    # the quick start's activations (batch x block x 4 n_embd) are fused, as measured
    quick_start = {}
    with open(os.path.join(REPO, 'config_shakespeare_char_cpu.py')) as f:
        exec(f.read(), quick_start)
    assert quick_start['batch_size'] * quick_start['block_size'] * 4 * quick_start['n_embd'] >= oscillation.FUSE_MIN_ELEMENTS


@pytest.mark.slow
def test_training_falls_back_where_torch_compile_is_not_supported(workdir):
    # as on Python 3.14 with torch < 2.10, where torch.compile itself raises a RuntimeError; the quick
    # start must train on with the unfused kernel (tests/simulated/simulated_faults.py)
    env = simulated_env(SIMULATED_COMPILE_UNSUPPORTED=1)
    # batch x block x 4 n_embd = 8 x 32 x 512 = 2**17 activations: large enough for 'auto' to fuse
    proc = run_script(workdir, 'train_bio.py', '--device=cpu', '--dtype=float32', '--dataset=tiny', '--n_layer=1',
                      '--n_head=2', '--n_embd=128', '--batch_size=8', '--block_size=32',
                      '--gradient_accumulation_steps=1', '--max_iters=2', '--eval_iters=1', '--eval_interval=100',
                      '--log_interval=1', '--out_dir=out', env=env)
    assert 'iter 2: loss ' in proc.stdout
    assert [line for line in message_lines(proc.stderr) if line.startswith('note: ')] == [
        'note: the fused oscillation kernel does not compile here (RuntimeError: Dynamo is not supported on '
        'Python 3.14+); using the unfused one']
