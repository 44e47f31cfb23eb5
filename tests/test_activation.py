"""
The oscillating activation: each implementation against the plain-ops reference (float64, gradcheck,
half precision), the memory it keeps for backward, and the fused kernel's fallback.

    python -m pytest tests/test_activation.py              (-m "not slow": the quick ones only)
"""

import os

import pytest
import torch

import model_bio
from bench_bio import saved_bytes
from conftest import REPO
from model_bio import GPT, GPTConfig, Oscillate, oscillate, oscillate_reference

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


def test_function_saves_only_its_input():
    x = torch.randn(256, N, requires_grad=True)
    ps = params(torch.float32, gate=True)
    vectors = 5 * N * 4
    assert saved_bytes(lambda: unfused(x, *ps, 0.25)) == x.numel() * 4 + vectors
    assert saved_bytes(lambda: fused(x, *ps, 0.25)) == x.numel() * 4 + vectors
    assert saved_bytes(lambda: torch.nn.functional.gelu(x)) == x.numel() * 4
    assert saved_bytes(lambda: oscillate_reference(x, *ps, 0.25)) > 4 * x.numel() * 4  # what the function avoids


def model_outputs(impl, monkeypatch, compiled=False):
    monkeypatch.setattr(model_bio, 'OSCILLATION_IMPL', impl)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, use_bio_mlp=True,
                          use_sparse_gate=True))
    idx = torch.randint(0, 50, (2, 16))
    run = torch.compile(model) if compiled else model
    logits, loss = run(idx, idx)
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}, model.read_sparsity()


@pytest.mark.parametrize('impl', ['function', 'fused'])
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
    monkeypatch.setattr(model_bio, 'fused_kernels', {})
    monkeypatch.setattr(model_bio, 'FUSE_MIN_ELEMENTS', 0)  # this small input is fused too
    torch._dynamo.reset()
    x = torch.randn(4, N, requires_grad=True)
    ps = params(torch.float32)
    with torch._inductor.config.patch({'cpp.cxx': ('/nonexistent/c++',), 'fx_graph_cache': False}):
        out = oscillate(x, *ps)
        out.sum().backward()
        assert 'does not compile here' in capsys.readouterr().err
        assert model_bio.fused_kernels['forward'] is False  # and it does not try again
        torch.testing.assert_close(out, oscillate_reference(x, *ps))
        monkeypatch.setattr(model_bio, 'OSCILLATION_IMPL', 'fused')
        monkeypatch.setattr(model_bio, 'fused_kernels', {})
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match='C.. compiler'):  # asked for by name: no quiet fallback
            oscillate(x, *ps)
    torch._dynamo.reset()
    assert (torch._inductor.config.fx_graph_cache, torch._inductor.config.cpp.cxx) == settings


@pytest.mark.parametrize('failing', ['forward', 'backward'])
def test_an_error_in_running_the_fused_kernel_surfaces_as_itself(monkeypatch, failing):
    # out of memory (or a device fault) after the kernel compiled is not a reason to stop fusing
    def out_of_memory(*args):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

    kernels = {'forward': model_bio.oscillate_forward_math, 'backward': model_bio.oscillate_backward_math}
    kernels[failing] = out_of_memory
    monkeypatch.setattr(model_bio, 'fused_kernels', dict(kernels))
    monkeypatch.setattr(model_bio, 'FUSE_MIN_ELEMENTS', 0)
    x = torch.randn(4, N, requires_grad=True)
    with pytest.raises(torch.OutOfMemoryError):
        oscillate(x, *params(torch.float32)).sum().backward()
    assert model_bio.fused_kernels == kernels  # still fusing


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
        return lambda *args: called.append(name) or model_bio.OSCILLATE_MATH[name](*args)

    monkeypatch.setattr(model_bio, 'fused_kernels', {name: recorded(name) for name in ('forward', 'backward')})
    rows = model_bio.FUSE_MIN_ELEMENTS // N
    oscillate(torch.randn(rows - 1, N, requires_grad=True), *params(torch.float32)).sum().backward()
    assert called == []  # one row short: run eagerly
    oscillate(torch.randn(rows, N, requires_grad=True), *params(torch.float32)).sum().backward()
    assert called == ['forward', 'backward']
    # the quick start's activations (batch x block x 4 n_embd) are fused, as measured
    quick_start = {}
    with open(os.path.join(REPO, 'config_shakespeare_char_cpu.py')) as f:
        exec(f.read(), quick_start)
    assert quick_start['batch_size'] * quick_start['block_size'] * 4 * quick_start['n_embd'] >= model_bio.FUSE_MIN_ELEMENTS
