"""The oneDNN convolutions on CPU compute what XLA's do, value and both gradients; they are
taken only when asked for (LDM_JAX_CPU_CONV=onednn), and the cases they do not cover, and
programs over several devices, are left to XLA."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from jax import lax

from ldm_jax.models import cpu_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, w, pad):
    return lax.conv_general_dilated(x, w, (1, 1), ((pad, pad),) * 2, dimension_numbers=NHWC)


def _loss(conv):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 32, 48, 3), (3, 5, 7, 5, 7, 3), (1, 6, 6, 3, 4, 5)])
def test_onednn_convolution_and_its_gradients_equal_xla(shape):
    n, h, w_, c, o, k = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w_, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, c, o)) * 0.2, jnp.float32)
    pad = k // 2
    hlo = jax.jit(lambda x, w: cpu_conv.same_conv(x, w, pad)).lower(x, w).as_text()
    assert "__onednn$convolution" in hlo  # the path under test is the oneDNN one
    (value, (dx, dw)) = _loss(lambda x, w: cpu_conv.same_conv(x, w, pad))(x, w)
    (want, (want_dx, want_dw)) = _loss(lambda x, w: _xla_conv(x, w, pad))(x, w)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4 * np.abs(want_dx).max())
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4 * np.abs(want_dw).max())


def test_the_xla_stand_ins_of_other_platforms_are_the_same_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 6, 5, 6)), jnp.float32)
    _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, 1), x, w)
    want_dx, want_dw = vjp(g)
    np.testing.assert_allclose(cpu_conv._input_grad(g, w, 1, False), want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cpu_conv._kernel_grad(x, g, 1, False), want_dw, rtol=1e-5, atol=1e-4)


def test_only_covered_convolutions_take_the_onednn_path_and_only_when_asked(monkeypatch):
    monkeypatch.setattr(cpu_conv, "_onednn_available", lambda: True)
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))

    def uses_onednn(*args, **kwargs):
        conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, *args, **kwargs)  # noqa: E731
        return "__onednn$convolution" in jax.jit(conv).lower(x, w).as_text()

    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    monkeypatch.delenv(cpu_conv.ENV, raising=False)
    assert not uses_onednn((1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)  # off by default
    monkeypatch.setenv(cpu_conv.ENV, "onednn")
    assert uses_onednn((1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    assert not uses_onednn((2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)  # strided
    assert not uses_onednn((1, 1), ((0, 0), (0, 0)), dimension_numbers=dn)  # "valid"
    assert not uses_onednn((1, 1), "SAME", dimension_numbers=dn)
    assert not uses_onednn((1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2), dimension_numbers=dn)
    with cpu_conv.onednn_allowed(False):
        assert not uses_onednn((1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)


def test_several_devices_keep_xla_convolutions():
    assert jax.device_count() > 1  # the test session's 8 simulated devices
    assert not cpu_conv._onednn_available()


_ONE_DEVICE_UNET = """
import json, jax, jax.numpy as jnp, numpy as np
from ldm_jax.models import cpu_conv
from ldm_jax.models.unet import UNet
unet = UNet(out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
            attention_levels=(False, True), num_attention_heads=2, norm_num_groups=8,
            context_dim=None)
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
t = jnp.asarray([3, 500])
params = unet.init(jax.random.key(0), x, t)
def loss(params):
    return jnp.mean(unet.apply(params, x, t) ** 2)
out = {"default_hlo": "__onednn$convolution" in jax.jit(loss).lower(params).as_text()}
for name, allowed in (("xla", False), ("onednn", True)):
    with cpu_conv.onednn_allowed(allowed):
        fn = jax.jit(jax.value_and_grad(lambda p: loss(p)))
        out[name + "_hlo"] = "__onednn$convolution" in fn.lower(params).as_text()
        value, grads = fn(params)
        out[name] = [float(value)] + [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
out["available"] = cpu_conv._onednn_available()
print(json.dumps(out))
"""


def test_a_unet_on_one_cpu_device_uses_onednn_and_trains_alike():
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", _ONE_DEVICE_UNET],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["available"] and out["onednn_hlo"] and not out["xla_hlo"]
    assert not out["default_hlo"]  # without LDM_JAX_CPU_CONV=onednn: XLA's convolutions
    np.testing.assert_allclose(out["onednn"], out["xla"], rtol=2e-4)
