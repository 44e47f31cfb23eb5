"""
The oscillating activation, sin(omega*x + phi) * tanh(x) + baseline (one omega, phi, baseline per hidden
neuron), optionally sparse-gated: its maths and the implementations that run it. Every bio MLP uses it:
v3 (model_bio.BioMLP, with or without model_bio.SparseGate) and the earlier v2 and v1 (lineage.py).

The sparse gate (from WiggleGPT v2, made exact) gives each hidden neuron a gate_weight and a gate_bias; it
fires where gate_weight * x + gate_bias > threshold, x being its pre-activation, and outputs exactly 0
elsewhere. The step has no gradient, so backward uses the gradient of sigmoid(5 * (voltage - threshold)) in
its place (straight-through).

Written as plain ops the activation keeps five full-size intermediates for backward. Its maths is written
once, forward (oscillate_forward_math) and backward (oscillate_backward_math, the derivative by hand), and
runs three ways that compute the same numbers (tests/test_activation.py: against each other, in float64
with gradcheck, and in bfloat16/float16 as autocast hands them over):
    plain     the formula as PyTorch ops (oscillate_reference): the reference, and what torch.compile
              fuses when the whole model is compiled
    function  a custom autograd function (Oscillate) that keeps only its input for backward and runs the
              hand-derived backward eagerly, reducing the per-neuron gradients in float32
    fused     the same function with that maths compiled into one kernel each way (Triton on CUDA, C++ on
              a CPU), compiled once per process on first use (about 4 s on this project's CPU)
OSCILLATION_IMPL = 'auto' uses plain inside a compiled model; fused for training where it compiles and a
call holds at least FUSE_MIN_ELEMENTS activations; function otherwise: inference (the forward alone gains
little from fusing), tiny models, or a machine where torch.compile cannot build a kernel, such as CUDA on
Windows without Triton (a one-line note says so and training carries on).

Why those choices, measured on a 2-core CPU (dev/LOG.md, 2026-11-27): for the quick-start model, fused
trains 3-4 ms per iteration faster than function at the same memory but costs about 4 s to compile at each
start; whole runs of 400 and 2000 iterations came out level (fusing pays only in longer runs, as real ones
are). plain was a little faster in those runs but keeps five times the memory. Fusing a call (forward +
backward) of 2**13 activations saves 0.02 ms, of 2**17 0.44 ms (bench_bio.py --part=act), against about
3.5 s of compiling at each start: below FUSE_MIN_ELEMENTS (2**17) it would take more than 8,000 layer-steps
to repay, so such small models run unfused. tanh is computed as 2 * sigmoid(2x) - 1, the same function,
because PyTorch's CPU tanh kernel is several times slower than its sigmoid.
"""

import sys

import torch
import torch.nn as nn

OSCILLATION_IMPL = 'auto'
FUSE_MIN_ELEMENTS = 2 ** 17


def tanh(x):
    """tanh(x) as 2 sigmoid(2x) - 1: the same function, but PyTorch's CPU tanh kernel (eager and
    compiled) is several times slower than its sigmoid; float32 error stays below 2e-7."""
    return torch.sigmoid(2.0 * x) * 2.0 - 1.0


def oscillate_reference(x, omega, phi, baseline, gate_weight=None, gate_bias=None, threshold=0.0):
    """The activation (and, with gate_weight, the sparse gate) as plain differentiable ops."""
    out = torch.sin(omega * x + phi) * tanh(x) + baseline
    if gate_weight is None:
        return out
    voltage = gate_weight * x + gate_bias - threshold
    fires = (voltage > 0).to(out.dtype)
    surrogate = torch.sigmoid(5.0 * voltage)
    return out * (fires + (surrogate - surrogate.detach()))  # value: fires; gradient: the sigmoid's


def oscillate_forward_math(x, omega, phi, baseline, gate_weight, gate_bias, threshold):
    """The forward values, computed in float32 (float64 for float64 input) and returned in x's dtype;
    under autocast that is the dtype the next Linear casts to anyway. (The reference's
    straight-through term is 0 in value.)"""
    return oscillate_reference(x.to(torch.promote_types(x.dtype, torch.float32)), omega, phi, baseline,
                               gate_weight, gate_bias, threshold).to(x.dtype)


def oscillate_backward_math(x, grad_out, omega, phi, baseline, gate_weight, gate_bias, threshold):
    """The gradients of oscillate_reference from x alone: (x, omega, phi, baseline, gate_weight,
    gate_bias); the per-neuron ones are reduced in float32. Intermediates are updated in place
    (never x or grad_out): run eagerly that saves allocations and passes over memory, and
    torch.compile fuses it all the same. Products keep the grouping of the plain formula, so eager
    and compiled runs round alike."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    g = grad_out.to(xf.dtype)
    n = x.size(-1)
    u = (xf * omega).add_(phi)
    sin_u, tanh_x = torch.sin(u), tanh(xf)
    grad_gate_weight = grad_gate_bias = grad_voltage = None
    if gate_weight is not None:
        voltage = (xf * gate_weight).add_(gate_bias - threshold)
        fires = voltage > 0
        surrogate = voltage.mul_(5.0).sigmoid_()
        # d out / d voltage = activation * 5 s (1 - s), s the surrogate sigmoid
        slope = (surrogate * 5.0).mul_(surrogate.neg_().add_(1.0))
        grad_voltage = (sin_u * tanh_x).add_(baseline).mul_(g).mul_(slope)
        grad_gate_weight = (grad_voltage * xf).reshape(-1, n).sum(0)
        grad_gate_bias = grad_voltage.reshape(-1, n).sum(0)
        g = g * fires  # the gradient reaching the activation: the step's value
    g_cos_tanh = u.cos_().mul_(g).mul_(tanh_x)
    grad_omega = (g_cos_tanh * xf).reshape(-1, n).sum(0)
    grad_phi = g_cos_tanh.reshape(-1, n).sum(0)
    # d out / dx = omega cos(u) tanh(x) + sin(u) (1 - tanh(x)^2)
    grad_x = g_cos_tanh.mul_(omega).add_(sin_u.mul_(g).mul_(tanh_x.mul_(tanh_x).neg_().add_(1.0)))
    if grad_voltage is not None:
        grad_x = grad_x.add_(grad_voltage.mul_(gate_weight))
    return (grad_x.to(x.dtype), grad_omega, grad_phi, g.reshape(-1, n).sum(0), grad_gate_weight, grad_gate_bias)


OSCILLATE_MATH = {'forward': oscillate_forward_math, 'backward': oscillate_backward_math}
fused_kernels = {}  # 'forward'/'backward' -> compiled function, once it has run here; False once fusing failed


def run_math(name, fuse, *args):
    """OSCILLATE_MATH[name](*args), through its compiled kernel if fuse and fusing works here."""
    formula = OSCILLATE_MATH[name]
    if not fuse or fused_kernels.get(name) is False:
        return formula(*args)
    if name in fused_kernels:
        # It has run here: an error now (out of memory, a device fault) is the run's own and surfaces,
        # unless it is torch.compile's. Dynamo recompiles the kernel when its guards fail (a new dtype
        # under autocast, requires_grad differing between frozen and trained blocks), and that can
        # fail as the first compile can (inductor's BackendCompilerFailed is a TorchDynamoException).
        try:
            return fused_kernels[name](*args)
        except Exception as e:
            from torch._dynamo.exc import TorchDynamoException
            from torch._inductor.exc import CppCompileError, InvalidCxxCompiler
            if not isinstance(e, (TorchDynamoException, CppCompileError, InvalidCxxCompiler)):
                raise
            give_up_fusing(e)
            return formula(*args)
    # Whatever fails in making the kernel or in its first call (which compiles it) says that fusing
    # does not work here: torch.compile raises a plain RuntimeError on a Python it does not support,
    # inductor its own errors without a C++ compiler or Triton. Forward and backward are each made
    # at their first call, so each is tried here on its own.
    try:
        kernel = torch.compile(formula, dynamic=True)
        out = kernel(*args)
    except Exception as e:
        give_up_fusing(e)
        return formula(*args)
    fused_kernels[name] = kernel
    return out


def give_up_fusing(error):
    """Fall back to the unfused function for the rest of the run, unless the fused kernel was asked
    for by name; then re-raise the error."""
    if OSCILLATION_IMPL == 'fused':
        raise error
    fused_kernels.update(forward=False, backward=False)
    print(f"note: the fused oscillation kernel does not compile here ({type(error).__name__}: "
          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); using the unfused one", file=sys.stderr)


class Oscillate(torch.autograd.Function):
    """oscillate_reference's values and gradients, saving only x (and the per-neuron vectors);
    fuse: run the maths through its compiled kernels."""

    @staticmethod
    def forward(ctx, x, omega, phi, baseline, gate_weight, gate_bias, threshold, fuse):
        ctx.save_for_backward(x, omega, phi, baseline, gate_weight, gate_bias)
        ctx.threshold, ctx.fuse = threshold, fuse
        return run_math('forward', fuse, x, omega, phi, baseline, gate_weight, gate_bias, threshold)

    @staticmethod
    def backward(ctx, grad_out):
        x, *vectors = ctx.saved_tensors  # read once: gradient checkpointing allows no second unpacking
        return *run_math('backward', ctx.fuse, x, grad_out, *vectors, ctx.threshold), None, None


def oscillate(x, omega, phi, baseline, gate_weight=None, gate_bias=None, threshold=0.0):
    """The activation through the implementation OSCILLATION_IMPL selects."""
    impl = OSCILLATION_IMPL
    if impl == 'auto':
        if torch.compiler.is_compiling():
            impl = 'plain'
        elif (torch.is_grad_enabled() and x.requires_grad and x.numel() >= FUSE_MIN_ELEMENTS
              and fused_kernels.get('forward') is not False):
            impl = 'fused'
        else:  # inference (the forward alone gains little from fusing), or too small to repay compiling
            impl = 'function'
    if impl not in ('plain', 'function', 'fused'):
        raise ValueError(f'OSCILLATION_IMPL={impl!r} is not one of auto, plain, function, fused')
    if impl == 'plain':
        return oscillate_reference(x, omega, phi, baseline, gate_weight, gate_bias, threshold)
    return Oscillate.apply(x, omega, phi, baseline, gate_weight, gate_bias, threshold, impl == 'fused')


class OscillatingActivation(nn.Module):
    """sin(omega*x + phi) * tanh(x) + baseline, one omega, phi, baseline per hidden neuron."""

    def __init__(self, n):
        super().__init__()
        self.omega = nn.Parameter(1.0 + 0.1 * torch.randn(n))
        self.phi = nn.Parameter(0.1 * torch.randn(n))
        self.baseline = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return oscillate(x, self.omega, self.phi, self.baseline)
