"""Training with the natural-gradient optax transformation.

Run: ``python docs/tutorials/training.py`` (float32, as JAX defaults to; seconds).
"""

# --8<-- [start:data]
import jax
import jax.numpy as jnp
import optax

import natchain as nc


def mlp(params, x):
    h = jnp.tanh(x @ params[0]["W"] + params[0]["b"])
    return h @ params[1]["W"] + params[1]["b"]


def init(key, sizes=(4, 16, 3)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"W": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


# Three Gaussian blobs in 4-D; a batch of 32 drawn afresh at every step.
centres = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 4))


def batch(key, n=32):
    ky, kx = jax.random.split(key)
    y = jax.random.randint(ky, (n,), 0, 3)
    return centres[y] + jax.random.normal(kx, (n, 4)), y


fam = nc.Categorical()


def loss(params, x, y):
    return jnp.mean(jax.vmap(fam.nll)(mlp(params, x), y))


# --8<-- [end:data]


# --8<-- [start:train]
def train(opt, steps=40, seed=1):
    """Plain optax loop; the natural-gradient member reads the batch from ``x=``, ``y=``."""
    params = init(jax.random.PRNGKey(seed))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params, x=x, y=y)
        return optax.apply_updates(params, updates), state

    for key in jax.random.split(jax.random.PRNGKey(seed + 100), steps):
        params, state = step(params, state, *batch(key))
    x_test, y_test = batch(jax.random.PRNGKey(7), 512)
    return float(loss(params, x_test, y_test)), state


optimisers = {
    "sgd": optax.sgd(0.1),
    # the exact natural gradient (Gram route), damped, then a learning rate
    "natural (exact)": optax.chain(
        nc.scale_by_natural_gradient(mlp, fam, damping=1e-3), optax.sgd(0.1)
    ),
    # the same with clipping and a schedule after it: optax.chain composes as usual
    "natural (exact), clipped": optax.chain(
        nc.scale_by_natural_gradient(mlp, fam, damping=1e-3),
        optax.clip_by_global_norm(5.0),
        optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.2, 40)),
    ),
    # the natural chain rule, with a cut-off that bounds 1/tanh' (see theory §3)
    "natural (modular)": optax.chain(
        nc.scale_by_natural_gradient(mlp, fam, method="modular", rcond=0.1), optax.sgd(0.1)
    ),
}
results = {name: train(opt) for name, opt in optimisers.items()}
for name, (test_loss, _) in results.items():
    print(f"{name:26s} test loss after 40 steps: {test_loss:.4f}")
# --8<-- [end:train]

# --8<-- [start:stats]
# The natural-gradient state carries the last step's statistics.
_, state = results["natural (exact)"]
info = state[0].info  # the first member of the chain: a NaturalGradientState
print({k: v for k, v in info.items() if jnp.ndim(v) == 0})  # the scalar statistics
print("result:", nc.RESULTS(int(info["result"])).name, "skipped steps:", int(state[0].num_skipped))
assert bool(info["finite"]) and int(state[0].num_skipped) == 0
initial = float(loss(init(jax.random.PRNGKey(1)), *batch(jax.random.PRNGKey(7), 512)))
for name, (test_loss, _) in results.items():
    assert test_loss < initial, (name, test_loss, initial)  # every optimiser learns
# --8<-- [end:stats]
