"""The kernel-or-JAX choice and the custom gradients of kernels: every op with a C++ kernel goes through here.

Choosing the path:

- :func:`on_cpu` ``(native, jax_path, *args)``: `native` (FFI calls into :mod:`.kernels`, or any
  code around them) in CPU programs, `jax_path` in every other program and wherever the kernels are
  off (``JAXREG_NATIVE=0``) or cannot be built. Both compute the same values (tested). The choice is
  made when the program is lowered: lowering for CPU builds the library (once per process,
  :mod:`.library`), lowering for any other platform never does, and a failed build lowers
  `jax_path`. Not differentiable: give the op a gradient with :func:`hand_gradient` or
  :func:`jax_gradient` around it, or use :func:`by_platform`.
- :func:`by_platform` ``(cpu, default, *args)``: the bare platform choice (``lax.platform_dependent``),
  for a CPU branch that must be differentiable; that branch reaches the kernels only through
  :func:`on_cpu`.

Gradients (custom_vjp plumbing):

- :func:`hand_gradient`: value and gradient from one hand-written ``value_and_gradient`` function.
- :func:`jax_gradient`: value from the decorated function (a kernel in CPU programs), gradient by
  autodiff of the JAX path that computes the same.
- :func:`with_vjp`: any other vector-Jacobian product (e.g. a self-adjoint filter).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Primitive, jaxpr_as_fun
from jax.interpreters import batching, mlir

from . import library

# ------------------------------------------------------------------------------------------------
# choosing the path
# ------------------------------------------------------------------------------------------------


def on_cpu(native, jax_path, *args):
    """``native(*args)`` in CPU programs with the kernels, ``jax_path(*args)`` everywhere else.
    `native` and `jax_path` take the same arguments (arrays) and return the same structure (the
    result has `jax_path`'s)."""
    if not library.enabled():
        return jax_path(*args)
    leaves, in_tree = jax.tree_util.tree_flatten(args)
    out_trees = []

    def flat(function):
        def run(*operands):
            out, out_tree = jax.tree_util.tree_flatten(function(*jax.tree_util.tree_unflatten(in_tree, operands)))
            out_trees.append(out_tree)
            return out
        return run

    out = _bind(flat(native), flat(jax_path), leaves)
    if out_trees[0].num_leaves != out_trees[1].num_leaves:
        raise TypeError(f"a kernel and its JAX path return different structures: {out_trees[0]}, {out_trees[1]}")
    return jax.tree_util.tree_unflatten(out_trees[1], out)


def by_platform(cpu, default, *args):
    """``cpu(*args)`` in CPU programs, ``default(*args)`` in every other; `default` alone when the
    kernels are off. Both are traced; only the program's platform's branch is lowered. `cpu` must
    reach the kernels through :func:`on_cpu` only (a bare FFI call would neither build the library
    nor give way to the JAX path when it cannot be built)."""
    if not library.enabled():
        return default(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def _bind(native, fallback, operands):
    """Bind the primitive on flat `operands`. Both paths are traced now, so that the values they
    close over (arrays of the program being traced) become operands too; lowering evaluates one of
    the two traces."""
    traces = [jax.make_jaxpr(function)(*operands) for function in (native, fallback)]
    consts = [c for trace in traces for c in trace.consts]
    paths, start = [], 0
    for trace in traces:
        paths.append(_Path(trace.jaxpr, start, len(trace.consts), len(consts)))
        start += len(trace.consts)
    return _kernel_p.bind(*consts, *operands, native=paths[0], fallback=paths[1],
                          results=tuple(traces[0].out_avals))


class _Path:
    """One traced path of a kernel call, as a function of all the call's operands (the consts of
    both traces, then the arguments). Hashable by identity, opaque to JAX's passes over params."""

    def __init__(self, jaxpr, start: int, count: int, consts: int):
        self.jaxpr, self.start, self.count, self.consts = jaxpr, start, count, consts

    def __call__(self, *operands):
        closed = ClosedJaxpr(self.jaxpr, list(operands[self.start:self.start + self.count]))
        return jaxpr_as_fun(closed)(*operands[self.consts:])


_kernel_p = Primitive("jaxreg_on_cpu")
_kernel_p.multiple_results = True
_kernel_p.def_abstract_eval(lambda *avals, native, fallback, results: results)
_kernel_p.def_impl(lambda *args, **params: jax.jit(functools.partial(_kernel_p.bind, **params))(*args))


def _lower_for_cpu(ctx, *args, native, fallback, results):
    return mlir.lower_fun(native if library.ready() else fallback, multiple_results=True)(ctx, *args)


def _lower_elsewhere(ctx, *args, native, fallback, results):
    return mlir.lower_fun(fallback, multiple_results=True)(ctx, *args)


def _batch(operands, dims, *, native, fallback, results):
    """vmap: both paths vmapped (the kernels' FFI calls loop over the batch), batch axis first."""
    dims = tuple(dims)  # None: not batched
    out = _bind(jax.vmap(native, dims), jax.vmap(fallback, dims), operands)
    return out, [0] * len(out)


mlir.register_lowering(_kernel_p, _lower_elsewhere)
mlir.register_lowering(_kernel_p, _lower_for_cpu, platform="cpu")
batching.primitive_batchers[_kernel_p] = _batch

# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------


def hand_gradient(value_and_gradient, nondiff_argnums=()):
    """Decorator: the function (whose value is ``value_and_gradient(*args)[0]``) differentiates as
    ``value_and_gradient(*args)[1]`` wrt its first argument, and as zero wrt the other differentiable
    ones. For losses whose gradient is cheaper written by hand, from the same samples as the value."""

    def decorate(function):
        wrapped = functools.wraps(function)(jax.custom_vjp(function, nondiff_argnums=tuple(nondiff_argnums)))

        def forward(*args):
            value, gradient = value_and_gradient(*args)
            others = [arg for i, arg in enumerate(args) if i > 0 and i not in nondiff_argnums]
            return value, (gradient, others)

        def backward(*args):  # the nondiff arguments, then the residuals and the cotangent
            (gradient, others), cotangent = args[-2:]
            return (cotangent * gradient, *(jax.tree_util.tree_map(jnp.zeros_like, arg) for arg in others))

        wrapped.defvjp(forward, backward)
        return wrapped

    return decorate


def with_vjp(vjp, nondiff_argnums=()):
    """Decorator: the function's value as it computes it, its vector-Jacobian product from
    ``vjp(args, cotangent)`` (args: all the arguments) as a tuple over the differentiable arguments."""
    nondiff = tuple(nondiff_argnums)

    def decorate(function):
        wrapped = functools.wraps(function)(jax.custom_vjp(function, nondiff_argnums=nondiff))

        def forward(*args):
            return function(*args), [arg for i, arg in enumerate(args) if i not in nondiff]

        def backward(*args):  # the nondiff arguments, then the residuals and the cotangent
            fixed, (differentiable, cotangent) = args[:-2], args[-2:]
            merged, fixed, differentiable = [], iter(fixed), iter(differentiable)
            for i in range(len(nondiff) + len(args[-2])):
                merged.append(next(fixed) if i in nondiff else next(differentiable))
            return tuple(vjp(merged, cotangent))

        wrapped.defvjp(forward, backward)
        return wrapped

    return decorate


def jax_gradient(jax_path, nondiff_argnums=()):
    """Decorator: the function's value as it computes it (a kernel in CPU programs), its gradient by
    autodiff of ``jax_path``, which takes the same arguments and computes the same value."""
    nondiff = tuple(nondiff_argnums)

    def vjp(args, cotangent):
        differentiable = [i for i in range(len(args)) if i not in nondiff]

        def of_differentiable(*values):
            merged = list(args)
            for i, value in zip(differentiable, values):
                merged[i] = value
            return jax_path(*merged)

        return jax.vjp(of_differentiable, *(args[i] for i in differentiable))[1](cotangent)

    return with_vjp(vjp, nondiff)
