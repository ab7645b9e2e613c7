"""Shared test cases: small models, families and data (a case is a small dict, as curvlinops does).

Every exact-route test draws from :data:`CASES`, so every solver is checked against the
dense pseudo-inverse on the same problems.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import natchain as nc

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}


def init_mlp(key, widths, bias=True, scale=1.0):
    """Parameters of an MLP ``widths[0] → … → widths[-1]`` as a list of dicts."""
    params = []
    for k, (a, b) in zip(
        jax.random.split(key, len(widths) - 1),
        zip(widths[:-1], widths[1:], strict=True),
        strict=True,
    ):
        kw, kb = jax.random.split(k)
        layer = {"W": scale * jax.random.normal(kw, (a, b)) / np.sqrt(a)}
        if bias:
            layer["b"] = 0.1 * jax.random.normal(kb, (b,))
        params.append(layer)
    return params


@functools.cache
def make_mlp(activation="tanh"):
    """A batched MLP ``model(params, x) -> eta`` (no activation after the last layer).

    Cached per activation, so every model with that activation is the same Python function
    and JAX's caches keyed on it are reused.
    """
    act = ACTIVATIONS[activation]

    def model(params, x):
        h = x
        for i, layer in enumerate(params):
            h = h @ layer["W"]
            if "b" in layer:
                h = h + layer["b"]
            if i < len(params) - 1:
                h = act(h)
        return h

    model.__name__ = f"mlp_{activation}"
    return model


def family_and_width(name, k):
    """A family and the model output width ``m`` that gives ``k`` 'units' of it."""
    return {
        "categorical": (nc.Categorical(), k),
        "bernoulli": (nc.Bernoulli(), k),
        "gaussian": (nc.Gaussian(scale=0.7), k),
        "hetero": (nc.GaussianHetero(), 2 * k),
        "poisson": (nc.Poisson(), k),
    }[name]


def sample_targets(family, eta, key):
    return jax.vmap(family.sample)(jax.random.split(key, eta.shape[0]), eta)


def make_case(family="categorical", widths=(3, 4), activation="tanh", batch=2, bias=True, seed=0):
    """Build a case dict: ``model, params, x, y, family`` plus its description."""
    key = jax.random.PRNGKey(seed)
    kp, kx, ky = jax.random.split(key, 3)
    fam, m = family_and_width(family, widths[-1])
    widths = (*widths[:-1], m)
    params = init_mlp(kp, widths, bias=bias)
    model = make_mlp(activation)
    x = jax.random.normal(kx, (batch, widths[0]))
    y = sample_targets(fam, model(params, x), ky)
    num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    return dict(
        model=model,
        params=params,
        x=x,
        y=y,
        family=fam,
        num_params=num_params,
        nm=batch * m,
        id=f"{family}-{'x'.join(map(str, widths))}-{activation}-N{batch}",
    )


# 1–3 layer MLPs, tanh and ReLU, every family, N·m < P and N·m > P.
CASE_SPECS = [
    dict(family="categorical", widths=(3, 5, 3), activation="tanh", batch=2),  # N·m < P
    dict(family="categorical", widths=(2, 3), activation="tanh", batch=6),  # N·m > P
    dict(family="bernoulli", widths=(3, 4, 4, 2), activation="relu", batch=3),
    dict(family="gaussian", widths=(3, 6, 2), activation="relu", batch=4),
    dict(family="hetero", widths=(2, 4, 1), activation="tanh", batch=3),
    dict(family="poisson", widths=(3, 4, 2), activation="tanh", batch=8),  # N·m < P
]
CASES = [make_case(**spec, seed=i) for i, spec in enumerate(CASE_SPECS)]


def flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def rel_err(a, b):
    """``‖a − b‖ / ‖b‖`` for pytrees or arrays."""
    a, b = flat(a), flat(b)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-300))


def kappa_of(ref):
    """``κ(F + λI)`` of a damped dense reference (``solver="pinv"``): its own ``condition``,
    the ratio of the extreme eigenvalues of ``F + λI`` (damped, nothing is cut)."""
    assert int(ref.stats["num_cut"]) == 0
    return float(ref.stats["condition"])


def check_residual_bound(sol, ref, kappa):
    """Successful, residual below tol, and within the residual bound of the reference."""
    st = sol.stats
    assert int(st["result"]) == int(nc.RESULTS.successful)
    assert bool(st["converged"])
    # the residual that decided success: float64's when it was asked for
    wide = np.isfinite(float(st["residual_float64"]))
    res = float(st["residual_float64"]) if wide else float(st["residual"])
    assert res <= float(st["tol"])
    # the bound κ · residual, and 1e-12 for the reference's own float64 round-off
    assert rel_err(sol.value, ref.value) <= kappa * res * 1.01 + 1e-12


# Small models in the styles researchers bring (float64; ``to32`` for float32).


def small_flax():
    import flax.linen as fnn

    net = fnn.Sequential([fnn.Dense(5), jnp.tanh, fnn.Dense(3)])
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    params = net.init(jax.random.PRNGKey(1), x)  # float32 by default: cast to float64
    return net.apply, jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params), x


def small_equinox():
    import equinox as eqx

    net = eqx.nn.MLP(3, 3, 5, 1, activation=jnp.tanh, key=jax.random.PRNGKey(2))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params, x


def small_conv():
    """conv 3×3 (2 → 3 channels, SAME, stride 2) + bias, tanh, dense head (12 → 3); N = 3."""
    dn = ("NHWC", "HWIO", "NHWC")

    def model(p, x):
        h = jax.lax.conv_general_dilated(x, p["k"], (2, 2), "SAME", dimension_numbers=dn)
        h = jnp.tanh(h + p["c"])
        return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]

    ks = jax.random.split(jax.random.PRNGKey(4), 5)
    params = {
        "k": 0.5 * jax.random.normal(ks[0], (3, 3, 2, 3)),
        "c": 0.1 * jax.random.normal(ks[1], (3,)),
        "w": 0.3 * jax.random.normal(ks[2], (12, 3)),
        "b": 0.1 * jax.random.normal(ks[3], (3,)),
    }
    return model, params, jax.random.normal(ks[4], (3, 4, 4, 2))


def to32(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), tree)
