"""Stride-1 "same" convolutions through oneDNN when the program runs on one CPU device.

XLA's CPU backend computes a 3x3 convolution and its two gradients 1.3x to 2.3x slower than
oneDNN's brgemm kernels at the U-Net's sizes (for example, 32 16x16 images from 192 to 64
channels: forward 19.6 against 8.4 ms, input gradient 12.8 against 8.9, kernel gradient 24.7
against 17.2), and convolutions are a large part of a training step there. The oneDNN runtime is
inside XLA's CPU backend already, behind the ``__onednn$convolution`` custom call, though
nothing in XLA emits it for these convolutions; this module emits it, with a custom gradient
that is two more forward convolutions:

* input gradient: the output gradient convolved with the kernel flipped in space and with
  its feature axes swapped;
* kernel gradient: the input with batch and channels swapped, (C, H, W, N), convolved with
  the output gradient read as an (H, W, N, O) kernel, giving (C, kh, kw, O).

``conv_general_dilated`` is a drop-in for ``lax.conv_general_dilated`` (what ``nn.Conv``
calls). It is opt-in, with ``LDM_JAX_CPU_CONV=onednn`` in the environment (or, in code,
``with onednn_allowed(True):`` around the tracing), because XLA cannot serialize a program
holding the custom call: such programs are never written to the persistent compilation
cache (jax warns "Error writing persistent compilation cache entry"), so every start
compiles them again. Worth it for a long run on a CPU, not for short ones. When on, the cases
it covers (2-D, NHWC/HWIO, float32, square odd kernel, stride 1, no dilation, one group,
padding kh // 2 on every side) go this way if there is exactly one device and it is a CPU;
everything else, and every other platform, is plain XLA. The same three convolutions written
with ``lax`` stand in on other platforms, so gradients are the same function everywhere. If
this jaxlib's CPU backend rejects the custom call, XLA's convolutions are used, with a
warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

log = logging.getLogger(__name__)

ENV = "LDM_JAX_CPU_CONV"  # "onednn": the oneDNN path where it applies
_ALLOWED = contextvars.ContextVar("onednn_convolutions_allowed", default=None)
_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)
_DATA = {"batch_dim": 0, "feature_dim": 3, "spatial_dims": [1, 2]}  # NHWC


def _config(pad: int, kernel: dict) -> str:
    window = {
        "pad_left": [pad, pad],
        "pad_right": [pad, pad],
        "strides": [1, 1],
        "window_dilations": [1, 1],
    }
    return json.dumps(
        {
            "onednn_conv_config": {
                "dims": 4,
                "feature_groups": 1,
                "input": {"data": _DATA},
                "kernel": {"filter": kernel},
                "output": {"data": _DATA},
                "window": window,
            }
        }
    )


_HWIO = {"input_feature_dim": 2, "output_feature_dim": 3, "spatial_dims": [0, 1]}
_HWOI = {"input_feature_dim": 3, "output_feature_dim": 2, "spatial_dims": [0, 1]}
_NHWO = {"input_feature_dim": 0, "output_feature_dim": 3, "spatial_dims": [1, 2]}


def _onednn(x: jax.Array, w: jax.Array, pad: int, kernel: dict, out_shape) -> jax.Array:
    call = jax.ffi.ffi_call(
        "__onednn$convolution",
        jax.ShapeDtypeStruct(out_shape, x.dtype),
        custom_call_api_version=1,
        legacy_backend_config=_config(pad, kernel),
        vmap_method="sequential",
    )
    return call(x, w)


def _xla(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_NHWC)


# The three convolutions of a forward and backward pass, each as oneDNN and as XLA computes it.
def _forward(x, w, pad, onednn):
    if onednn:
        return _onednn(x, w, pad, _HWIO, (*x.shape[:3], w.shape[3]))
    return _xla(x, w, pad)


def _input_grad(g, w, pad, onednn):
    flipped = jnp.flip(w, (0, 1))
    if onednn:  # the flipped kernel read as (kh, kw, out, in): no transpose materialised
        return _onednn(g, flipped, pad, _HWOI, (*g.shape[:3], w.shape[2]))
    return _xla(g, jnp.swapaxes(flipped, 2, 3), pad)


def _kernel_grad(x, g, pad, onednn):
    xt = jnp.transpose(x, (3, 1, 2, 0))  # (C, H, W, N)
    k = 2 * pad + 1
    if onednn:
        dw = _onednn(xt, g, pad, _NHWO, (x.shape[3], k, k, g.shape[3]))
    else:
        dw = lax.conv_general_dilated(
            xt,
            g,
            (1, 1),
            ((pad, pad), (pad, pad)),
            dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 0, 1, 2), (0, 3, 1, 2)),
        )
    return jnp.transpose(dw, (1, 2, 0, 3))  # (kh, kw, C, O)


def _on_platform(fn, *args, pad):
    """``fn(*args, pad, onednn)``: oneDNN where the program runs on a CPU, XLA elsewhere."""
    return lax.platform_dependent(
        *args,
        cpu=functools.partial(fn, pad=pad, onednn=True),
        default=functools.partial(fn, pad=pad, onednn=False),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def same_conv(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
    """A stride-1 NHWC/HWIO convolution padded by ``pad`` = kh // 2, through oneDNN on CPU."""
    return _on_platform(_forward, x, w, pad=pad)


def _same_conv_fwd(x, w, pad):
    return same_conv(x, w, pad), (x, w)


def _same_conv_bwd(pad, residuals, g):
    x, w = residuals
    return _on_platform(_input_grad, g, w, pad=pad), _on_platform(_kernel_grad, x, g, pad=pad)


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def _covered(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
        return False
    kh, kw = rhs.shape[:2]
    pad = kh // 2
    return (
        kh == kw
        and kh % 2 == 1
        and kh > 1
        and tuple(window_strides) == (1, 1)
        and not isinstance(padding, str)
        and tuple(map(tuple, padding)) == ((pad, pad), (pad, pad))
        and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
    )


@functools.cache
def _onednn_available() -> bool:
    """Whether this process runs on exactly one CPU device whose backend takes the call."""
    if jax.device_count() != 1 or jax.devices()[0].platform != "cpu":
        return False
    x = np.arange(32, dtype=np.float32).reshape(1, 4, 4, 2)
    w = np.linspace(-1, 1, 36, dtype=np.float32).reshape(3, 3, 2, 2)
    try:
        with jax.ensure_compile_time_eval():  # run now, also when first met inside a trace
            got = jax.jit(lambda x, w: _forward(x, w, pad=1, onednn=True))(x, w)
            want = jax.jit(lambda x, w: _xla(x, w, 1))(x, w)
        ok = np.allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    except Exception as error:  # a jaxlib whose CPU backend lacks or changed the call
        log.warning("oneDNN convolutions unavailable (%s); using XLA's", error)
        return False
    if not ok:
        log.warning("oneDNN convolution disagrees with XLA's on a check; using XLA's")
    else:
        log.info(
            "3x3 convolutions through oneDNN (%s=onednn); programs holding them are not "
            "written to the persistent compilation cache",
            ENV,
        )
    return ok


def _wanted() -> bool:
    allowed = _ALLOWED.get()
    if allowed is None:
        return os.environ.get(ENV, "").lower() == "onednn"
    return allowed


@contextlib.contextmanager
def onednn_allowed(allowed: bool):
    """Within it, programs traced take the oneDNN path if ``allowed`` (and it is available),
    whatever the environment says: e.g. to compare the two, or to count FLOPs on the plain
    XLA program (XLA's cost analysis does not see into the custom call)."""
    token = _ALLOWED.set(allowed)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def conv_general_dilated(lhs, rhs, window_strides, padding, **options):
    """``lax.conv_general_dilated``, through oneDNN for the cases it covers on one CPU."""
    if _wanted() and _covered(lhs, rhs, window_strides, padding, **options):
        if _onednn_available():
            return same_conv(lhs, rhs, rhs.shape[0] // 2)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
