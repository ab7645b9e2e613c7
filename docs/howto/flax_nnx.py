"""Natural gradients of a Flax NNX model: exact route, natural chain rule, training.

Run: ``python docs/howto/flax_nnx.py`` (float32, as JAX defaults to; seconds).
"""

# --8<-- [start:model]
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import natchain as nc
from natchain.diagnostics import compare


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


kx, ky, kinit = jax.random.split(jax.random.PRNGKey(0), 3)
x = jax.random.normal(kx, (5, 6))  # N = 5 examples, 6 features
y = jax.random.randint(ky, (5,), 0, 3)
fam = nc.Categorical()

net = MLP(nnx.Rngs(0))
graphdef, params = nnx.split(net)  # params: an nnx.State, a pytree of arrays


def model(params, x):  # natchain's form: model(params, x) -> (N, m)
    return nnx.merge(graphdef, params)(x)


# --8<-- [end:model]


# --8<-- [start:exact]
def rel(a, b):
    """Relative difference of two pytrees."""
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


exact = nc.natural_gradient(model, params, x, y, fam, solver="pinv")
gram = nc.natural_gradient(model, params, x, y, fam, solver="gram")
print(f"gram vs pinv: {rel(gram.value, exact.value):.1e}")  # a pytree like params
# float32 (eps ≈ 1.2e-7): two direct solves of this small, well-posed system agree to
# a few eps times its condition number, far below the 1e-4 checked.
assert rel(gram.value, exact.value) < 1e-4
# --8<-- [end:exact]

# --8<-- [start:modular]
# One Linear layer fed by data, rank [X 1] = N: the natural chain rule is exact by theorem.
dense_graphdef, dense_params = nnx.split(nnx.Linear(6, 3, rngs=nnx.Rngs(1)))


def dense_model(params, x):
    return nnx.merge(dense_graphdef, params)(x)


modular = nc.grad(dense_model, fam)(dense_params, x, y)  # granularity="layer" by default
reference = nc.natural_gradient(dense_model, dense_params, x, y, fam).value
print(f"one Linear layer, modular vs exact: {rel(modular, reference):.1e}")
assert rel(modular, reference) < 1e-4  # float32 round-off of a theorem

# The MLP: parameters at two layers, so the rule is not guaranteed; measure how far off.
cmp = compare(model, params, x, y, fam, methods=["exact:pinv", "modular:layer"])
print(f"MLP, cosine modular vs exact: {cmp.pairs[('exact:pinv', 'modular:layer')].cosine:.3f}")
# --8<-- [end:modular]

# --8<-- [start:train]
opt = optax.chain(nc.scale_by_natural_gradient(model, fam, damping=1e-3), optax.sgd(0.5))
state = opt.init(params)


def loss(params):
    return jnp.mean(jax.vmap(fam.nll)(model(params, x), y))


@jax.jit
def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params, x=x, y=y)
    return optax.apply_updates(params, updates), state


before = loss(params)
for _ in range(5):
    params, state = step(params, state)
print(f"loss {float(before):.4f} -> {float(loss(params)):.4f}")
assert loss(params) < before
nnx.update(net, params)  # write the trained parameters back into the module
# --8<-- [end:train]
