"""Modular vs exact: when the natural chain rule gives the natural gradient, and when not.

Run: ``python docs/tutorials/modular_vs_exact.py`` (float64, seconds).
"""

# --8<-- [start:setup]
import jax
import jax.numpy as jnp

import natchain as nc
from natchain.diagnostics import compare, rank_report

jax.config.update("jax_enable_x64", True)


def dense(params, x):
    return x @ params["W"] + params["b"]


def mlp(params, x):
    h = jnp.tanh(x @ params[0]["W"] + params[0]["b"])
    return h @ params[1]["W"] + params[1]["b"]


keys = jax.random.split(jax.random.PRNGKey(1), 6)
x = jax.random.normal(keys[0], (4, 6))  # N = 4 examples, d = 6 features
y = jax.random.bernoulli(keys[1], 0.5, (4, 2)).astype(jnp.float64)  # m = 2 binary labels
fam = nc.Bernoulli()  # F_eta = diag(p (1 − p)): invertible, not a multiple of the identity
one_layer = {"W": jax.random.normal(keys[2], (6, 2)), "b": jnp.zeros(2)}
# --8<-- [end:setup]

# --8<-- [start:exact_case]
# One dense layer fed by data: the batch-joint Jacobian w.r.t. (W, b) is (X Xᵀ + 11ᵀ) ⊗ I,
# of full row rank exactly when rank [X 1] = N. Here rank [X 1] = 4 = N.
report = rank_report(dense, one_layer, x, fam)
print(report)
assert report.exact, report.reasons

cmp = compare(dense, one_layer, x, y, fam, methods=["exact:pinv", "modular:layer", "sgd"])
print(cmp.to_markdown())
pair = cmp.pairs[("exact:pinv", "modular:layer")]
# A theorem, checked in float64: the two agree to round-off (1e-10 leaves room for the
# conditioning of the N·m × N·m system).
assert pair.relative_error < 1e-10
# --8<-- [end:exact_case]

# --8<-- [start:rank_condition]
# The same layer on a batch whose rows are affinely dependent: x_3 = (x_1 + x_2) / 2
# makes rank [X 1] = 3 < N = 4 although N ≤ d + 1. The condition fails and so does the rule.
x_dep = x.at[3].set((x[1] + x[2]) / 2)
report = rank_report(dense, one_layer, x_dep, fam)
print(report.verdict, "-", "; ".join(report.reasons))
assert not report.exact
cmp = compare(dense, one_layer, x_dep, y, fam, methods=["exact:pinv", "modular:layer"])
pair = cmp.pairs[("exact:pinv", "modular:layer")]
print(f"rank [X 1] = 3: cos {pair.cosine:.3f}, relative error {pair.relative_error:.3f}")
# A counterexample, not round-off: the error is many orders above float64's 1e-16.
assert pair.relative_error > 1e-6
# --8<-- [end:rank_condition]

# --8<-- [start:mlp]
# Parameters at two layers: each layer splits the step between its weights and its input.
two_layer = [
    {"W": jax.random.normal(keys[3], (6, 5)) / jnp.sqrt(6.0), "b": jnp.zeros(5)},
    {"W": jax.random.normal(keys[4], (5, 2)) / jnp.sqrt(5.0), "b": jnp.zeros(2)},
]
report = rank_report(mlp, two_layer, x, fam)
print(report.verdict, "| exact in function space:", report.function_space_exact)
methods = ["exact:pinv", "modular:layer", "modular:primitive"]
cmp = compare(mlp, two_layer, x, y, fam, methods=methods)
print(cmp.to_markdown())
for (a, b), p in cmp.pairs.items():
    print(
        f"{a} vs {b}: cos {p.cosine:.3f}, function-space relative error "
        f"{p.function_relative_error:.2e}"
    )
# --8<-- [end:mlp]

# --8<-- [start:function_space]
# When every map of the chain has full row rank and F_eta is invertible, the modular step m
# solves F_θ m = g like the exact e does: J m = J e, and m − e lies in null(F_θ).
if report.function_space_exact:
    p = cmp.pairs[("exact:pinv", "modular:layer")]
    # float64; 1e-8 relative in function space leaves room for the chain's conditioning.
    assert p.function_relative_error < 1e-8
# --8<-- [end:function_space]
