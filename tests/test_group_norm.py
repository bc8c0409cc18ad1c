"""GroupNorm's formulations (NORM_IMPLS) against torch.nn.GroupNorm (and SiLU after it): forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from uncond_flax.models import layers
from uncond_flax.models.layers import GroupNorm, group_norm, implementations

# (shape NHWC or NTC, groups): 2 channels per group (the digits UNet), one group, a group per channel, tokens.
CASES = [((2, 5, 6, 16), 8), ((2, 3, 4, 12), 1), ((1, 4, 4, 8), 8), ((2, 7, 24), 4)]


def _torch_norm(x, groups, weight, bias, probe, activation=None):
    """torch's output and the gradients of sum(out * probe) for x, weight and bias (channels last in and out)."""
    channels = x.shape[-1]
    module = torch.nn.GroupNorm(groups, channels, eps=1e-5)
    module.weight.data, module.bias.data = torch.from_numpy(weight), torch.from_numpy(bias)
    x_t = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_(True)
    out = module(x_t) if activation is None else activation(module(x_t))
    (out * torch.from_numpy(np.moveaxis(probe, -1, 1).copy())).sum().backward()
    to_last = lambda a: np.moveaxis(a.detach().numpy(), 1, -1)  # noqa: E731
    return to_last(out), to_last(x_t.grad), module.weight.grad.numpy(), module.bias.grad.numpy()


# Each formulation with its group means as dots (channel_sums' and fused's default on CPU) and as a reshape.
GROUP_MEANS = ("dot", "reshape")
FORMULATIONS = [("grouped", "auto"), *((impl, means) for impl in ("channel_sums", "fused") for means in GROUP_MEANS)]


@pytest.fixture
def group_means(request, monkeypatch):
    monkeypatch.setattr(layers, "GROUP_MEANS", request.param)
    return request.param


@pytest.mark.parametrize("impl, group_means", FORMULATIONS, indirect=["group_means"])
@pytest.mark.parametrize("shape, groups", CASES)
def test_group_norm_matches_torch_forward_and_gradients(impl, group_means, shape, groups):
    rng = np.random.default_rng(0)
    # An offset and a spread, so that a missing mean or a one-pass variance would show.
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    probe = rng.standard_normal(shape).astype(np.float32)
    channels = shape[-1]
    weight, bias = rng.uniform(0.5, 2, channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    with implementations(norm=impl):
        norm = group_norm(channels, groups, 1e-5, rngs=nnx.Rngs(0))
    assert isinstance(norm, GroupNorm) and norm.impl == impl
    norm.scale.value, norm.bias.value = jnp.asarray(weight), jnp.asarray(bias)

    def loss(params, x):
        model = nnx.merge(graphdef, params)
        return jnp.sum(model(x) * probe), model(x)

    graphdef, params = nnx.split(norm)
    (g_params, g_x), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    out_t, gx_t, gw_t, gb_t = _torch_norm(x, groups, weight, bias, probe)
    np.testing.assert_allclose(np.asarray(out), out_t, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g_x), gx_t, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g_params["scale"][...]), gw_t, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_params["bias"][...]), gb_t, atol=1e-4, rtol=1e-5)


# The activation after the norm: SiLU is what the fused implementation takes into its backward pass; ReLU is
# applied after it as after the others.
ACTIVATIONS = [(jax.nn.silu, torch.nn.functional.silu), (jax.nn.relu, torch.relu)]


@pytest.mark.parametrize("impl, group_means", FORMULATIONS, indirect=["group_means"])
@pytest.mark.parametrize("activation, torch_activation", ACTIVATIONS)
@pytest.mark.parametrize("shape, groups", [CASES[0], CASES[3]])
def test_group_norm_then_activation_matches_torch(impl, group_means, activation, torch_activation, shape, groups):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3 - 1).astype(np.float32)
    probe = rng.standard_normal(shape).astype(np.float32)
    channels = shape[-1]
    weight, bias = rng.uniform(-2, 2, channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    with implementations(norm=impl):
        norm = group_norm(channels, groups, 1e-5, rngs=nnx.Rngs(0))
    norm.scale.value, norm.bias.value = jnp.asarray(weight), jnp.asarray(bias)
    graphdef, params = nnx.split(norm)

    def loss(params, x):
        out = nnx.merge(graphdef, params)(x, activation=activation)
        return jnp.sum(out * probe), out

    (g_params, g_x), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    out_t, gx_t, gw_t, gb_t = _torch_norm(x, groups, weight, bias, probe, torch_activation)
    np.testing.assert_allclose(np.asarray(out), out_t, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g_x), gx_t, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g_params["scale"][...]), gw_t, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_params["bias"][...]), gb_t, atol=1e-4, rtol=1e-5)


def test_group_means_are_dots_on_cpu_and_a_reshape_when_asked(monkeypatch):
    # On CPU the per-channel sums become group means through two small dots, so that the (B, C) means reach the
    # element-wise loops as plain vectors (a repeat fused there costs an integer division per element).
    x = jnp.ones((2, 4, 4, 12), jnp.float32)
    with implementations(norm="channel_sums"):
        norm = group_norm(12, 4, 1e-5, rngs=nnx.Rngs(0))

    def primitives():
        return {str(e.primitive) for e in jax.make_jaxpr(lambda x: norm(x))(x).jaxpr.eqns}  # traced afresh

    assert jax.default_backend() != "cpu" or "dot_general" in primitives()
    monkeypatch.setattr(layers, "GROUP_MEANS", "reshape")
    assert "dot_general" not in primitives()
    monkeypatch.setattr(layers, "GROUP_MEANS", "dot")
    assert "dot_general" in primitives()


def test_fused_norm_keeps_x_for_its_backward_pass_not_the_norms_output():  # and is the default on CPU
    # What the forward pass keeps for the backward one: with SiLU taken in, the float32 norm output and its sigmoid
    # are not among the residuals (only x, the parameters and the (B, C) statistics), unlike autodiff's.
    x = jnp.ones((2, 8, 8, 32), jnp.bfloat16)
    kept = {}
    for impl in ("channel_sums", "fused", "auto"):
        with implementations(norm=impl):
            norm = group_norm(32, 8, 1e-5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(norm)
        residuals = jax.vjp(lambda x: nnx.merge(graphdef, params)(x, activation=jax.nn.silu), x)[1]
        kept[impl] = sum(leaf.size for leaf in jax.tree.leaves(residuals) if leaf.ndim == 4)
    assert kept["fused"] == x.size and kept["channel_sums"] >= 2 * x.size
    assert jax.default_backend() != "cpu" or kept["auto"] == kept["fused"]  # the CPU default is fused


def test_group_norm_formulations_agree_in_bfloat16():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 32)) * 2 + 1, jnp.bfloat16)
    probe = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 4, 32)), jnp.bfloat16)
    outs, grads = [], []
    for impl in ("grouped", "channel_sums", "fused"):
        with implementations(norm=impl):
            norm = group_norm(32, 8, 1e-5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        out, vjp = jax.vjp(lambda x: norm(x, activation=jax.nn.silu), x)
        (grad,) = vjp(probe)
        assert out.dtype == grad.dtype == jnp.bfloat16
        outs.append(np.asarray(out, np.float32))
        grads.append(np.asarray(grad, np.float32))
    # All normalise in float32 and round once to bfloat16; summation order may flip a last bit.
    for out, grad in zip(outs[1:], grads[1:]):
        np.testing.assert_allclose(out, outs[0], atol=2e-2, rtol=0)
        np.testing.assert_allclose(grad, grads[0], atol=3e-2, rtol=0)


def test_unknown_norm_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match="implementations: norm='welford' is not supported; choose one of 'auto',"):
        implementations(norm="welford").__enter__()
