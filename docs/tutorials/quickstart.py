"""The natural gradient of your own model in five minutes.

Run: ``python docs/tutorials/quickstart.py`` (a few seconds on a laptop CPU).
"""

# --8<-- [start:model]
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import natchain as nc

jax.config.update("jax_enable_x64", True)  # float64: agreement to ~1e-10 is visible


def mlp(params, x):
    """Any function ``(params, x) -> eta`` with ``eta`` of shape ``(N, m)`` will do."""
    h = jnp.tanh(x @ params[0]["W"] + params[0]["b"])
    return h @ params[1]["W"] + params[1]["b"]


k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
params = [
    {"W": jax.random.normal(k1, (5, 8)) / jnp.sqrt(5.0), "b": jnp.zeros(8)},
    {"W": jax.random.normal(k2, (8, 3)) / jnp.sqrt(8.0), "b": jnp.zeros(3)},
]
x = jax.random.normal(k3, (6, 5))  # N = 6 examples with 5 features
y = jax.random.randint(k4, (6,), 0, 3)  # class labels
fam = nc.Categorical()  # softmax over the m = 3 outputs
# --8<-- [end:model]

# --8<-- [start:exact]
# The exact natural gradient F_θ⁺ g of the mean negative log-likelihood.
sol = nc.natural_gradient(mlp, params, x, y, fam, solver="pinv")
print("rank of F_theta:", int(sol.stats["rank"]), "of", ravel_pytree(params)[0].size)
print("cut-off eigenvalues:", int(sol.stats["num_cut"]))

# Three routes to the same vector: dense pseudo-inverse, Gram (output space), and CG.
gram = nc.natural_gradient(mlp, params, x, y, fam, solver="gram")
cg = nc.natural_gradient(mlp, params, x, y, fam, solver="cg", tol=1e-12)


def rel(a, b):
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


print(f"gram vs pinv: {rel(gram.value, sol.value):.1e}")
print(f"cg   vs pinv: {rel(cg.value, sol.value):.1e}  ({int(cg.stats['num_steps'])} CG steps)")
# float64: the three agree to round-off. Gram and pinv are direct solves (1e-8 leaves room
# for the conditioning of F_θ); CG stops at a relative residual of 1e-12, which bounds its
# error by about that times the condition number of F_θ on its range.
assert rel(gram.value, sol.value) < 1e-8
assert rel(cg.value, sol.value) < 1e-6
# --8<-- [end:exact]

# --8<-- [start:step]
# As a function, jit-able, shaped like params: one natural-gradient step.
natgrad = jax.jit(nc.grad(mlp, fam, method="exact", solver="gram", damping=1e-3))


def loss(p):
    return jnp.mean(jax.vmap(fam.nll)(mlp(p, x), y))  # nll is per example


step = natgrad(params, x, y)
new = jax.tree_util.tree_map(lambda p, n: p - 0.5 * n, params, step)
print(f"loss {float(loss(params)):.4f} -> {float(loss(new)):.4f}")
assert loss(new) < loss(params)
# --8<-- [end:step]
