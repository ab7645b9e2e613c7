"""The optax transformation ``scale_by_natural_gradient``."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import natchain as nc

optax = pytest.importorskip("optax")

# ---- problems --------------------------------------------------------------------------


def _linear_regression(n=24, d=3, seed=0):
    kx, kn = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (n, d))
    w_true = jnp.arange(1.0, d + 1.0)[:, None] * jnp.array([[1.0], [-1.0], [0.5]])[:d]
    y = x @ w_true + 0.3 + 0.2 * jax.random.normal(kn, (n, 1))
    params = {"w": jnp.zeros((d, 1)), "b": jnp.zeros((1,))}
    return (lambda p, x: x @ p["w"] + p["b"]), params, x, y


def _mlp_params(key, sizes):
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True):
        params.append({"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros((b,))})
    return params


def _mlp(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def _classification(n=16, sizes=(4, 6, 3), seed=0):
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = _mlp_params(kp, sizes)
    x = jax.random.normal(kx, (n, sizes[0]))
    y = jax.random.randint(ky, (n,), 0, sizes[-1])
    return _mlp, params, x, y


def _loss(model, family, params, x, y):
    return jnp.mean(jax.vmap(family.nll)(model(params, x), y))


def _flat(tree):
    return ravel_pytree(tree)[0]


@functools.partial(jax.jit, static_argnums=0)
def _jit_update(tx, grads, state, params, batch):
    return tx.update(grads, state, params, **batch)


def _update(tx, grads, state, params, **batch):
    """``tx.update`` under ``jit`` (compiling once is much faster than op-by-op dispatch)."""
    return _jit_update(tx, grads, state, params, batch)


@functools.partial(jax.jit, static_argnames=("model", "family", "kind", "num_samples"))
def _exact(model, params, x, y, family, *, damping, kind="true", key=None, num_samples=1):
    """The dense pseudo-inverse reference, jitted."""
    return nc.natural_gradient(
        model,
        params,
        x,
        y,
        family,
        solver="pinv",
        kind=kind,
        damping=damping,
        key=key,
        num_samples=num_samples,
    ).value


# ---- the exact step ----------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["pinv", "gram", "cg"])
def test_scale_by_natural_gradient_linear_regression_one_step_lands_on_optimum(solver):
    """Gaussian family, exact true Fisher, step size 1: one step is the least-squares fit."""
    model, params, x, y = _linear_regression()
    fam = nc.Gaussian()
    opt = optax.chain(nc.scale_by_natural_gradient(model, fam, solver=solver), optax.scale(-1.0))
    state = opt.init(params)
    grads = jax.grad(lambda p: _loss(model, fam, p, x, y))(params)
    updates, state = _update(opt, grads, state, params, x=x, y=y)
    new = optax.apply_updates(params, updates)
    design = jnp.hstack([x, jnp.ones((x.shape[0], 1))])
    lstsq = jnp.linalg.lstsq(design, y)[0].ravel()
    np.testing.assert_allclose(
        _flat({"b": new["b"], "w": new["w"]}),
        _flat({"b": lstsq[-1:], "w": lstsq[:-1, None]}),
        rtol=1e-8,
        atol=1e-10,
    )
    # Already at the optimum: the next step is zero.
    grads = jax.grad(lambda p: _loss(model, fam, p, x, y))(new)
    updates, _ = _update(opt, grads, state, new, x=x, y=y)
    assert float(jnp.linalg.norm(_flat(updates))) < 1e-8


def test_scale_by_natural_gradient_matches_natural_gradient():
    """The transformation returns ``natural_gradient(...).value`` (damped, Gram, softmax)."""
    model, params, x, y = _classification()
    fam = nc.Categorical()
    tx = nc.scale_by_natural_gradient(model, fam, solver="gram", damping=1e-3)
    updates, state = _update(tx, params, tx.init(params), params, x=x, y=y)
    ref = _exact(model, params, x, y, fam, damping=1e-3)
    np.testing.assert_allclose(_flat(updates), _flat(ref), rtol=1e-9, atol=1e-12)
    assert int(state.count) == 1 and bool(state.info["finite"])


def test_scale_by_natural_gradient_composes_with_chain_clip_and_schedule():
    """Clipping and a schedule act on the natural step; the whole chain jits and trains."""
    model, params, x, y = _classification()
    fam = nc.Categorical()
    sched = optax.linear_schedule(0.5, 0.1, transition_steps=5)
    opt = optax.chain(
        nc.scale_by_natural_gradient(model, fam, solver="cg", damping=1e-2, tol=1e-10),
        optax.clip_by_global_norm(1.0),
        optax.scale_by_learning_rate(sched),
    )
    state = opt.init(params)
    loss = lambda p: _loss(model, fam, p, x, y)

    @jax.jit
    def step(p, s):
        updates, s = opt.update(jax.grad(loss)(p), s, p, x=x, y=y)
        return optax.apply_updates(p, updates), s, updates

    nat = _exact(model, params, x, y, fam, damping=1e-2)
    nat = _flat(nat)
    clipped = nat * min(1.0, 1.0 / float(jnp.linalg.norm(nat)))
    p, state, updates = step(params, state)
    np.testing.assert_allclose(_flat(updates), -0.5 * clipped, rtol=1e-7, atol=1e-10)
    losses = [float(loss(params)), float(loss(p))]
    for _ in range(5):
        p, state, updates = step(p, state)
        losses.append(float(loss(p)))
        assert float(jnp.linalg.norm(_flat(updates))) <= 0.5 + 1e-12
    assert losses[-1] < 0.8 * losses[0]
    assert int(state[0].count) == 6


def test_scale_by_natural_gradient_trust_region_bound_holds():
    """With ``max_kl`` the returned step has ``½ uᵀ F u ≤ max_kl`` under the true Fisher."""
    model, params, x, y = _classification(seed=1)
    fam = nc.Categorical()
    fisher = nc.fisher_matrix(model, params, x, fam)
    free = _flat(_exact(model, params, x, y, fam, damping=1e-4))
    kl_free = 0.5 * free @ fisher @ free
    for max_kl in (1e-3, 10 * float(kl_free)):
        tx = nc.scale_by_natural_gradient(model, fam, solver="gram", damping=1e-4, max_kl=max_kl)
        u, s = _update(tx, params, tx.init(params), params, x=x, y=y)
        kl = 0.5 * _flat(u) @ fisher @ _flat(u)
        assert float(kl) <= max_kl * (1 + 1e-8)
        np.testing.assert_allclose(float(s.info["kl"]), float(kl), rtol=1e-8)
        if max_kl < kl_free:
            np.testing.assert_allclose(float(kl), max_kl, rtol=1e-8)  # scaled to the boundary
            assert float(s.info["scale"]) < 1
        else:
            np.testing.assert_allclose(_flat(u), free, rtol=1e-8, atol=1e-12)
            assert float(s.info["scale"]) == 1.0


@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_scale_by_natural_gradient_other_fisher_kinds(kind):
    """MC (key from the state or given) and empirical Fisher match ``natural_gradient``."""
    model, params, x, y = _classification()
    fam = nc.Categorical()
    tx = nc.scale_by_natural_gradient(
        model, fam, solver="gram", kind=kind, damping=1e-3, num_samples=2
    )
    key = jax.random.PRNGKey(7)
    u, state = _update(tx, params, tx.init(params), params, x=x, y=y, key=key)
    ref = _exact(model, params, x, y, fam, damping=1e-3, kind=kind, key=key, num_samples=2)
    np.testing.assert_allclose(_flat(u), _flat(ref), rtol=1e-8, atol=1e-12)
    if kind == "mc":  # without a key, successive steps draw fresh samples from the state's key
        u1, state = _update(tx, params, state, params, x=x, y=y)
        u2, state = _update(tx, params, state, params, x=x, y=y)
        assert not np.allclose(_flat(u1), _flat(u2))


def test_scale_by_natural_gradient_damping_schedule():
    """``damping`` may be a schedule of the step count."""
    model, params, x, y = _classification()
    fam = nc.Categorical()
    tx = nc.scale_by_natural_gradient(model, fam, solver="gram", damping=lambda c: 1.0 / (1 + c))
    u0, state = _update(tx, params, tx.init(params), params, x=x, y=y)
    u1, _ = _update(tx, params, state, params, x=x, y=y)
    for u, lam in ((u0, 1.0), (u1, 0.5)):
        ref = _exact(model, params, x, y, fam, damping=lam)
        np.testing.assert_allclose(_flat(u), _flat(ref), rtol=1e-8, atol=1e-12)


# ---- parameter pytrees ---------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Linear:
    """An Equinox-style module: array fields are leaves, the activation is static."""

    weight: jax.Array
    bias: jax.Array
    activation: object = dataclasses.field(default=None, metadata={"static": True})

    def __call__(self, x):
        out = x @ self.weight.T + self.bias
        return out if self.activation is None else self.activation(out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Sequential:
    layers: list


def _module_model(module, x):
    for layer in module.layers:
        x = layer(x)
    return x


@functools.cache
def _plain_reference():
    """The exact damped natural gradient of the plain-dict MLP, as a list of ``(w, b)``."""
    model, params, x, y = _classification()
    ref = _exact(model, params, x, y, nc.Categorical(), damping=1e-3)
    return [(layer["w"], layer["b"]) for layer in ref]


def _check_pytree_step(model, params, x, y, as_plain):
    """One jitted chain step keeps the pytree's structure and equals the plain-dict answer.

    ``as_plain`` maps a pytree shaped like ``params`` to the plain list of ``(w, b)``.
    """
    fam = nc.Categorical()
    opt = optax.chain(
        nc.scale_by_natural_gradient(model, fam, solver="cg", damping=1e-3), optax.scale(-0.3)
    )
    state = opt.init(params)
    grads = jax.grad(lambda p: _loss(model, fam, p, x, y))(params)
    updates, state = _update(opt, grads, state, params, x=x, y=y)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
    for (w, b), (rw, rb) in zip(as_plain(updates), _plain_reference(), strict=True):
        np.testing.assert_allclose(w, -0.3 * rw, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(b, -0.3 * rb, rtol=1e-7, atol=1e-10)
    assert float(_flat(grads) @ _flat(updates)) < 0  # a descent step


def test_scale_by_natural_gradient_plain_dict_params():
    model, params, x, y = _classification()
    _check_pytree_step(model, params, x, y, lambda t: [(lay["w"], lay["b"]) for lay in t])


def test_scale_by_natural_gradient_flax_style_params():
    """Flax (linen) parameters: ``{"params": {"Dense_0": {"kernel", "bias"}, ...}}``."""
    _, plain, x, y = _classification()
    params = {
        "params": {
            f"Dense_{i}": {"kernel": layer["w"], "bias": layer["b"]}
            for i, layer in enumerate(plain)
        }
    }

    def model(variables, x):
        p = variables["params"]
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    def as_plain(t):
        t = t["params"]
        return [(t[f"Dense_{i}"]["kernel"], t[f"Dense_{i}"]["bias"]) for i in range(2)]

    _check_pytree_step(model, params, x, y, as_plain)


@pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax is not installed")
def test_scale_by_natural_gradient_flax_linen_module():
    import flax.linen as fnn

    class MLP(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            hidden = fnn.Dense(6)(x)  # named Dense_0: modules are named in creation order
            return fnn.Dense(3)(jnp.tanh(hidden))

    _, plain, x, y = _classification()
    net = MLP()
    variables = net.init(jax.random.PRNGKey(0), x)
    variables = {
        "params": {
            f"Dense_{i}": {"kernel": lay["w"], "bias": lay["b"]} for i, lay in enumerate(plain)
        }
    }

    def as_plain(t):
        t = t["params"]
        return [(t[f"Dense_{i}"]["kernel"], t[f"Dense_{i}"]["bias"]) for i in range(2)]

    _check_pytree_step(net.apply, variables, x, y, as_plain)


def test_scale_by_natural_gradient_module_style_params():
    """A custom pytree node class shaped like an Equinox module (static fields kept)."""
    _, plain, x, y = _classification()
    module = _Sequential(
        [
            _Linear(plain[0]["w"].T, plain[0]["b"], activation=jnp.tanh),
            _Linear(plain[1]["w"].T, plain[1]["b"]),
        ]
    )
    _check_pytree_step(
        _module_model, module, x, y, lambda t: [(lay.weight.T, lay.bias) for lay in t.layers]
    )


@pytest.mark.skipif(importlib.util.find_spec("equinox") is None, reason="equinox is not installed")
def test_scale_by_natural_gradient_equinox_module():
    """A real ``eqx.nn.MLP``: its array part is the parameter pytree."""
    import equinox as eqx

    _, plain, x, y = _classification()
    net = eqx.nn.MLP(4, 3, 6, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    for i, lay in enumerate(plain):
        net = eqx.tree_at(
            lambda n, i=i: (n.layers[i].weight, n.layers[i].bias), net, (lay["w"].T, lay["b"])
        )
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def model(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    _check_pytree_step(
        model, params, x, y, lambda t: [(lay.weight.T, lay.bias) for lay in t.layers]
    )


# ---- the modular rule and bad input ------------------------------------------------------------


def test_scale_by_natural_gradient_modular_uses_natchain_grad():
    """``method="modular"`` returns ``natchain.grad(..., method="modular")``, or refuses clearly."""
    model, params, x, y = _classification()
    fam = nc.Categorical()
    if not hasattr(nc, "grad"):
        with pytest.raises(NotImplementedError, match="natchain.grad"):
            nc.scale_by_natural_gradient(model, fam, method="modular")
        return
    for granularity in ("layer", "primitive"):
        tx = nc.scale_by_natural_gradient(model, fam, method="modular", granularity=granularity)
        u, state = _update(tx, params, tx.init(params), params, x=x, y=y)
        fn = jax.jit(nc.grad(model, fam, method="modular", granularity=granularity))
        ref = fn(params, x, y)
        np.testing.assert_allclose(_flat(u), _flat(ref), rtol=1e-10, atol=1e-12)
        assert int(state.count) == 1


def test_scale_by_natural_gradient_refuses_bad_configuration():
    model, params, x, y = _classification()
    fam = nc.Categorical()
    with pytest.raises(ValueError, match="method"):
        nc.scale_by_natural_gradient(model, fam, method="kfac")
    with pytest.raises(ValueError, match="kind"):
        nc.scale_by_natural_gradient(model, fam, kind="fisher")
    with pytest.raises(ValueError, match="max_kl"):
        nc.scale_by_natural_gradient(model, fam, max_kl=0.0)
    with pytest.raises(ValueError, match="damping"):
        nc.scale_by_natural_gradient(model, fam, damping=-1.0)
    with pytest.raises(ValueError, match="solver"):
        nc.scale_by_natural_gradient(model, fam, solver="lu")
    with pytest.raises(ValueError, match="granularity"):
        nc.scale_by_natural_gradient(model, fam, granularity="primitive")
    with pytest.raises(TypeError, match="family"):
        nc.scale_by_natural_gradient(model, "categorical")
    tx = nc.scale_by_natural_gradient(model, fam)
    with pytest.raises(ValueError, match="x=x, y=y"):
        tx.update(params, tx.init(params), params)


# ---- non-finite steps, chain order, statistics in the state, determinism ---------------------


def _diverging_run(guard, steps=8, lr=30.0):
    """float32 Poisson regression, exact Gram steps, learning rate 30: the log-rates blow up.

    The rates ``exp(eta)`` overflow float32 after a few steps, so the Fisher and the natural
    gradient become non-finite (measured: at the fifth step).
    """
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (16, 3)).astype(jnp.float32)
    y = jax.random.poisson(ky, 2.0, (16, 1)).astype(jnp.float32)
    model = lambda p, x: x @ p["w"] + p["b"]
    params = {"w": jnp.zeros((3, 1), jnp.float32), "b": jnp.zeros((1,), jnp.float32)}
    fam = nc.Poisson()
    opt = optax.chain(nc.scale_by_natural_gradient(model, fam, guard=guard), optax.sgd(lr))
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: _loss(model, fam, q, x, y))(p)
        u, s = opt.update(g, s, p, x=x, y=y)
        return optax.apply_updates(p, u), s

    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append((bool(jnp.all(jnp.isfinite(_flat(params)))), state[0]))
    return history


def test_guard_never_lets_a_non_finite_step_into_the_parameters():
    """Driven to divergence (lr 30, float32): parameters stay finite, skips are recorded.

    Without the guard the same run writes NaN into the parameters (the guard is what
    makes the difference, so this test can fail).
    """
    history = _diverging_run(guard=True)
    assert all(finite for finite, _ in history)
    last = history[-1][1]
    assert int(last.num_skipped) >= 1  # the run did reach non-finite natural gradients
    skipped = [bool(s.info["skipped"]) for _, s in history]
    assert sum(skipped) == int(last.num_skipped)
    assert all(not bool(s.info["finite"]) for _, s in history if bool(s.info["skipped"]))
    unguarded = _diverging_run(guard=False)
    assert not all(finite for finite, _ in unguarded)


def test_chain_order_mistake_shows_in_grad_cosine():
    """``optax.sgd`` placed before the transformation: recorded cosine −1 (``stats="full"``)."""
    model, params, x, y = _classification()
    fam = nc.Categorical()
    grads = jax.grad(lambda p: _loss(model, fam, p, x, y))(params)
    ng = nc.scale_by_natural_gradient(model, fam, damping=1e-3, stats="full")
    right = optax.chain(ng, optax.sgd(0.1))
    wrong = optax.chain(optax.sgd(0.1), ng)
    _, s_right = _update(right, grads, right.init(params), params, x=x, y=y)
    _, s_wrong = _update(wrong, grads, wrong.init(params), params, x=x, y=y)
    np.testing.assert_allclose(float(s_right[0].info["grad_cosine"]), 1.0, rtol=1e-12)
    np.testing.assert_allclose(float(s_wrong[1].info["grad_cosine"]), -1.0, rtol=1e-12)


def test_state_info_keys_are_fixed_and_carry_solver_statistics():
    """The info has the same structure at init and after a step; solver stats land in it."""
    model, params, x, y = _classification()
    fam = nc.Categorical()
    tx = nc.scale_by_natural_gradient(model, fam, solver="cg", damping=1e-3)
    state = tx.init(params)
    _, new = _update(tx, params, state, params, x=x, y=y)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(new)
    assert int(new.info["result"]) == nc.RESULTS.successful and bool(new.info["converged"])
    assert int(new.info["num_steps"]) > 0
    norms = jax.tree_util.tree_leaves(new.info["leaf_step_norm"])
    np.testing.assert_allclose(
        float(jnp.sqrt(sum(n**2 for n in norms))), float(new.info["step_norm"]), rtol=1e-12
    )


def test_modular_state_records_per_map_cuts():
    """``method="modular"``: per-map ``num_cut`` in the state, filled at init from a batch."""
    model, params, x, y = _classification()
    fam = nc.Categorical()
    tx = nc.scale_by_natural_gradient(model, fam, method="modular", rcond=0.5, example_batch=(x, y))
    state = tx.init(params)
    _, new = _update(tx, params, state, params, x=x, y=y)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(new)
    maps = new.info["maps"]
    assert any(k.endswith("_tanh") for k in maps)
    total = sum(int(m["num_cut"]) for m in maps.values())
    assert total == int(new.info["num_cut"]) and total > 0  # rcond 0.5 cuts something
    ref = nc.grad(model, fam, rcond=0.5, return_stats=True)(params, x, y)[1]
    assert int(ref["num_cut"]) == total


def test_optimiser_is_deterministic_for_mc():
    """Same seed, same batches: bit-identical parameters after three ``kind="mc"`` steps."""
    model, params, x, y = _classification()
    fam = nc.Categorical()

    def run():
        tx = optax.chain(
            nc.scale_by_natural_gradient(model, fam, kind="mc", damping=1e-3, seed=5),
            optax.sgd(0.1),
        )
        p, s = params, tx.init(params)
        for _ in range(3):
            u, s = _update(tx, p, s, p, x=x, y=y)
            p = optax.apply_updates(p, u)
        return _flat(p)

    assert np.array_equal(run(), run())


def test_basic_statistics_skip_extra_evaluations_and_full_fills_them():
    """``stats="basic"`` (default): same step, ``kl``/``grad_cosine`` ``nan``, updates unread.

    ``"full"`` adds the KL (checked against ``½ uᵀ F u`` with the dense Fisher) and the
    cosine. Float64; ``rtol=1e-10`` between two compiled programs of the same solve
    (round-off only), ``1e-8`` for the KL as in the trust-region test.
    """
    model, params, x, y = _classification(seed=2)
    fam = nc.Categorical()
    grads = jax.grad(lambda p: _loss(model, fam, p, x, y))(params)
    basic = nc.scale_by_natural_gradient(model, fam, solver="gram", damping=1e-3)
    full = nc.scale_by_natural_gradient(model, fam, solver="gram", damping=1e-3, stats="full")
    u_b, s_b = _update(basic, grads, basic.init(params), params, x=x, y=y)
    u_f, s_f = _update(full, grads, full.init(params), params, x=x, y=y)
    np.testing.assert_allclose(_flat(u_b), _flat(u_f), rtol=1e-10)
    assert np.isnan(float(s_b.info["kl"])) and np.isnan(float(s_b.info["grad_cosine"]))
    assert int(s_b.info["result"]) == nc.RESULTS.successful
    np.testing.assert_allclose(float(s_b.info["grad_norm"]), float(jnp.linalg.norm(_flat(grads))))
    fisher = nc.fisher_matrix(model, params, x, fam)
    np.testing.assert_allclose(
        float(s_f.info["kl"]), float(0.5 * _flat(u_f) @ fisher @ _flat(u_f)), rtol=1e-8
    )
    np.testing.assert_allclose(float(s_f.info["grad_cosine"]), 1.0, rtol=1e-12)
    # "basic" never reads the incoming updates (the solve has its own gradient).
    junk = jax.tree_util.tree_map(lambda g: jnp.full_like(g, jnp.nan), grads)
    u_j, s_j = _update(basic, junk, basic.init(params), params, x=x, y=y)
    np.testing.assert_array_equal(_flat(u_j), _flat(u_b))
    assert not bool(s_j.info["skipped"])
    with pytest.raises(ValueError, match="stats="):
        nc.scale_by_natural_gradient(model, fam, stats="everything")
    with pytest.raises(ValueError, match="refresh_every"):
        nc.scale_by_natural_gradient(model, fam, refresh_every=0)


def test_minimal_statistics_modular_step_unchanged_and_unchecked():
    """``stats="minimal"``, modular: the same step as ``"basic"`` (same chain rule, run
    without its statistics), but nothing claimed: ``not_checked``, ``converged`` false,
    ``grad_norm`` and ``residual`` ``nan``, no per-map records, the incoming updates unread.
    For ``method="exact"`` it is ``"basic"``: the residual test still runs and passes.
    Float64; ``rtol=1e-10`` between two compiled programs of the same rule (round-off).
    """
    model, params, x, y = _classification(seed=4)
    fam = nc.Categorical()
    grads = jax.grad(lambda p: _loss(model, fam, p, x, y))(params)
    basic = nc.scale_by_natural_gradient(model, fam, method="modular")
    minimal = nc.scale_by_natural_gradient(model, fam, method="modular", stats="minimal")
    u_b, s_b = _update(basic, grads, basic.init(params), params, x=x, y=y)
    u_m, s_m = _update(minimal, grads, minimal.init(params), params, x=x, y=y)
    np.testing.assert_allclose(_flat(u_m), _flat(u_b), rtol=1e-10)
    # "basic" measures the modular step (here it is not a natural gradient: the test says so)
    assert np.isfinite(float(s_b.info["residual"])) and s_b.info["maps"]
    assert int(s_b.info["result"]) != nc.RESULTS.not_checked
    assert int(s_m.info["result"]) == nc.RESULTS.not_checked
    assert not bool(s_m.info["converged"]) and s_m.info["maps"] == {}
    assert np.isnan(float(s_m.info["grad_norm"])) and np.isnan(float(s_m.info["residual"]))
    junk = jax.tree_util.tree_map(lambda g: jnp.full_like(g, jnp.nan), grads)
    u_j, s_j = _update(minimal, junk, minimal.init(params), params, x=x, y=y)
    np.testing.assert_array_equal(_flat(u_j), _flat(u_m))
    assert not bool(s_j.info["skipped"])
    exact = nc.scale_by_natural_gradient(model, fam, solver="gram", damping=1e-3, stats="minimal")
    _, s_e = _update(exact, grads, exact.init(params), params, x=x, y=y)
    assert int(s_e.info["result"]) == nc.RESULTS.successful
    assert float(s_e.info["residual"]) <= float(s_e.info["tol"])


class _StampedCG(nc.CG):
    """A CG whose ``prepare`` stamps the parameters' sum; ``solve`` reports what it got."""

    def prepare(self, problem, damping):
        return jnp.sum(problem.flat)

    def solve(self, problem, damping, prepared=None):
        n, stats = super().solve(problem, damping)
        return n, dict(stats, condition=prepared)


def test_refresh_every_keeps_prepared_between_refreshes():
    """``prepare`` runs at steps 0, 2, 4 (``refresh_every=2``); ``solve`` gets the kept value."""
    model, params, x, y = _classification(seed=3)
    fam = nc.Categorical()
    tx = nc.scale_by_natural_gradient(
        model, fam, solver=_StampedCG(), damping=1e-3, refresh_every=2, example_batch=(x, y)
    )
    state = tx.init(params)
    assert state.prepared is not None  # shaped at init from example_batch
    start = jax.tree_util.tree_structure(state)
    p, stamps, sums = params, [], []
    for _ in range(5):
        sums.append(float(_flat(p).sum()))
        u, state = _update(tx, p, state, p, x=x, y=y)
        assert jax.tree_util.tree_structure(state) == start
        stamps.append(float(state.prepared))
        np.testing.assert_allclose(float(state.info["condition"]), stamps[-1], rtol=1e-12)
        assert int(state.info["result"]) == nc.RESULTS.successful
        p = jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, p, u)
    expect = [sums[0], sums[0], sums[2], sums[2], sums[4]]
    np.testing.assert_allclose(stamps, expect, rtol=1e-12)
    assert len(set(expect)) == 3  # the parameters did move: a stale stamp would show
    # without example_batch the first update prepares it
    tx2 = nc.scale_by_natural_gradient(model, fam, solver=_StampedCG(), damping=1e-3)
    s2 = tx2.init(params)
    assert s2.prepared is None
    _, s2 = _update(tx2, params, s2, params, x=x, y=y)
    np.testing.assert_allclose(float(s2.prepared), sums[0], rtol=1e-12)
