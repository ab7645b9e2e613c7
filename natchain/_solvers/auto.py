"""``solver="auto"``: pick the cheapest exact route from static facts, at trace time.

The facts are known before anything runs: the batch size ``N``, the output width ``m``,
the output-factor width ``r`` (``N·r`` is the Gram system's size), the parameter count
``P``, the dtype, whether the damping is known to be positive, the Fisher kind, how many
parameters the Gram route's per-layer structure covers, and whether a dense ``P × P``
matrix is allowed (``P ≤ max_params``). Each candidate route has an estimated time in
seconds; the cheapest applicable one runs, and its code is reported as
``stats["route"]`` (an index into :data:`ROUTES`).

Cost model (seconds; ``c`` the flops of one forward pass over the batch, by XLA's cost
analysis of the model, else ``2·N·P`` as for a dense network)::

    pass      = c / RATE_PASS + OVERHEAD_PASS        one JVP, VJP or forward pass
                (c / RATE_PASS_CONV with convolutions)
    jac(p)    = min(N·m, p) · 2·N·p / RATE_PASS        Jacobian for p parameters
    dense     = jac(P) + 2·N·r·P² / RATE_MATMUL        J, then Bᵀ B
              + P³ / RATE_CHOL   (cholesky)  or  P³ / RATE_EIGH   (pinv)
    gram      = r·pass / 2                             batched backward passes for D̃
              + 2·(N²·Σa + (N·r)²·Σb) / RATE_MATMUL    blocks X Xᵀ ∘ D̃ D̃ᵀ of the layers
              (+ jac and 2·(N·r)²·p for the p parameters the structure does not cover)
              + (N·r)³ / RATE_CHOL (damped) or (N·r)³ / RATE_EIGH (undamped)
              + 3·pass                                 split (one K product), map back
    cg        = K_CG(dtype, conv) · (3·pass)           one JVP and one VJP per step
    pcg       = K_PCG(dtype, conv) · (3·pass) + pass + 2·P^1.5 / RATE_MATMUL  (when registered)
    gram_cg   = r·pass / 2 + 2·N²·Σa' / RATE_MATMUL    D̃, the factored layers' kernels
              + 2·N·r²·Σb / RATE_MATMUL                the per-example diagonal blocks
              + steps · (2·N²·Σb' / RATE_MATMUL + OVERHEAD_PASS
                         + 3·(pass · (P − P') / P))    the rest through the model
              + 3·pass                                 split, map back
      steps   = (4 + 25·√(N / Σa)) · (1 + min(2·N·r / P, 8)) · GCG_BITS(dtype)
                (5·N^0.75 in place of the first factor with convolutions)

and every route pays the residual test (three passes), left out as common to all (the
Gram route's refinement runs only where that test fails, so it is not costed). The
``Σa``, ``Σb`` are the summed input and output widths of the layers the structure
covers (a ``W`` of shape ``(a, b)``). The constants were measured on the development
machine (2 x86 cores, XLA's CPU backend, float32, under load from other processes): a
1280² matrix product ran at ``≈ 9·10¹⁰`` flop/s, a Cholesky factorisation in
``≈ n³ / (4·10¹⁰)`` seconds (0.7 ms at ``n = 320``, 53 ms at ``n = 1280``),
``jnp.linalg.eigh`` in ``≈ n³ / 10¹⁰`` seconds (3 ms at ``n = 320``), a JVP and a VJP of
the 784-128-10 MLP at batch 32 in ``≈ 0.3`` ms (``≈ 6·10¹⁰`` flop/s, ``≈ 20 µs`` fixed);
CG took 19–35 steps to the float32 default tolerance at damping ``10⁻³`` on that MLP
(``K_CG = 30`` in float32, ``100`` in float64, where the tolerance is ``10⁻¹⁰``); on the
MNIST-1D CNN it took 98–272 (``K_CG = 250`` in float32 where the structure has a
convolution), and a pass of that CNN ran at ``≈ 6·10⁹`` flop/s (XLA's CPU convolutions),
so there the Gram route wins up to batches of a few hundred.
``benchmarks/bench.py --auto-grid`` checks the choice against every fixed route on a
grid (benchmarks/README.md).

Candidates are the entries of :data:`CANDIDATES` whose name is registered in
:data:`natchain.SOLVERS`: adding a route is one entry (a name, when it applies, its cost).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp

from natchain._solvers._base import DEFAULT_MAX_PARAMS, AbstractSolver

#: Route codes of ``stats["route"]``: the index of the chosen route's name.
ROUTES = ("pinv", "cholesky", "gram", "cg", "pcg", "gram_cg")

RATE_MATMUL = 9e10  # flop/s, large matrix products
RATE_PASS = 6e10  # flop/s, a forward/JVP/VJP pass of the model
RATE_PASS_CONV = 6e9  # flop/s, the same for a model with convolutions (XLA's CPU convolutions)
OVERHEAD_PASS = 2e-5  # s, fixed cost of one pass
RATE_CHOL = 4e10  # n³ per second for a Cholesky factorisation (n³/3 flops at 1.3e10 flop/s)
RATE_EIGH = 1e10  # n³ per second for a symmetric eigendecomposition
K_CG = {64: 100, 32: 30, 16: 10}  # expected CG steps by float width
# With convolutions the Fisher is far worse conditioned: on the MNIST-1D CNN (three
# convolutions, ReLU) at damping 1e-3 plain CG took 98 / 238 / 272 steps in float32 at
# N = 32 / 128 / 512 (benchmarks/peer.py); float64 and 16-bit scaled as for dense networks.
K_CG_CONV = {64: 800, 32: 250, 16: 80}
# Expected Kronecker-preconditioned CG steps: on the 784-128-10 MLP at damping 1e-3 it took
# 89–147 steps in float32 where plain CG took 19–36 (its preconditioner claims curvature on
# directions where the low-rank Fisher has none), so it is costed at that count.
K_PCG = {64: 400, 32: 120, 16: 40}
K_PCG_CONV = {64: 2000, 32: 600, 16: 200}  # 457–669 steps on the MNIST-1D CNN in float32
# Block-Jacobi CG on the output-space system (solver="gram_cg"), float32 at damping 1e-3 on
# the tanh MLPs of benchmarks/bench.py --auto-grid: the steps grow as the square root of the
# batch over the summed layer inputs Σa (the input Gram's aspect ratio: 4, 6, 10, 20 steps
# at N = 8 … 512 for 784-128-10; 7, 18, 48, 76 for 64-128-10), and faster once N·r nears P
# (C turns singular and its near-null directions must be resolved as well: 133 steps for
# 64-16-10, P = 1210, at N = 512). With convolutions they grow as N^0.75 (67 / 239 / 582
# steps on the MNIST-1D CNN at N = 32 / 128 / 512). Other float widths scale by their
# tolerance, as for CG.
GCG_BITS = {64: 3.0, 32: 1.0, 16: 0.5}


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the choice is made from (all static)."""

    n: int  # batch size
    m: int  # model output width
    r: int  # output-factor width
    p: int  # parameter count
    bits: int  # float width of the parameters
    damped: bool | None  # damping known > 0 (None: unknown before tracing)
    kind: str
    structured: int  # parameters covered by the Gram route's per-layer structure
    gram_in: int = 0  # Σ input widths of the covered matrix leaves (rows of W, all but last axis)
    gram_out: int = 0  # Σ output widths of the covered leaves (last axis; a bias: its size)
    dense_ok: bool = True  # P ≤ max_params
    conv: bool = False  # the model has a recognised convolution (CG is costed at more steps)
    flops: float | None = None  # of one forward pass over the batch (None: 2·N·P, dense)
    factored: int = 0  # parameters whose product with C is factored (solver="gram_cg")
    factored_in: int = 0  # Σa of those layers
    factored_out: int = 0  # Σb of those layers


def _pass(f: Facts, share: float = 1.0) -> float:
    """One pass over the model, or over the ``share`` of it a product in some leaves needs."""
    flops = 2.0 * f.n * f.p if f.flops is None else f.flops
    return share * flops / (RATE_PASS_CONV if f.conv else RATE_PASS) + OVERHEAD_PASS


def _jacobian(f: Facts, p: int) -> float:
    """The Jacobian for ``p`` of the parameters (reverse or forward mode, batched)."""
    return min(f.n * f.m, p) * 2.0 * f.n * p / RATE_PASS + 2 * OVERHEAD_PASS


def _dense(f: Facts, rate: float) -> float:
    return _jacobian(f, f.p) + 2.0 * f.n * f.r * f.p**2 / RATE_MATMUL + f.p**3 / rate


def _gram(f: Facts) -> float:
    size = f.n * f.r
    build = 0.5 * f.r * _pass(f)  # one batched backward pass per factor column
    build += 2.0 * (f.n**2 * f.gram_in + size**2 * f.gram_out) / RATE_MATMUL
    rest = f.p - f.structured
    if rest > 0:
        build += _jacobian(f, rest) + 2.0 * size**2 * rest / RATE_MATMUL
    factor = size**3 / (RATE_CHOL if f.damped else RATE_EIGH)
    return build + factor + 3 * _pass(f)


def _cg(f: Facts) -> float:
    return (K_CG_CONV if f.conv else K_CG)[f.bits] * 3 * _pass(f)


def _pcg(f: Facts) -> float:
    steps = (K_PCG_CONV if f.conv else K_PCG)[f.bits]
    return (steps * 3 + 1) * _pass(f) + 2.0 * f.p**1.5 / RATE_MATMUL


def _gram_cg_steps(f: Facts) -> float:
    if f.conv:
        steps = 5.0 * f.n**0.75
    else:
        steps = 4.0 + 25.0 * math.sqrt(f.n / max(f.gram_in, 1))
    return steps * (1.0 + min(2.0 * f.n * f.r / f.p, 8.0)) * GCG_BITS[f.bits]


def _gram_cg(f: Facts) -> float:
    build = 0.5 * f.r * _pass(f) + 2.0 * f.n**2 * f.factored_in / RATE_MATMUL  # D̃, kernels
    build += 2.0 * f.n * f.r**2 * f.gram_out / RATE_MATMUL  # the diagonal blocks
    step = 2.0 * f.n**2 * f.factored_out / RATE_MATMUL + OVERHEAD_PASS
    rest = (f.p - f.factored) / f.p  # the rest goes through the model, as a CG step
    if rest > 0:
        step += 3 * _pass(f, rest)
    return build + _gram_cg_steps(f) * step + 3 * _pass(f)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One route ``auto`` may pick: its registered name, when it applies, its cost."""

    name: str
    applies: Callable[[Facts], bool]
    cost: Callable[[Facts], float]


def _iterative_ok(f: Facts) -> bool:
    # CG needs a positive definite system: undamped, it converges only where g lies in
    # the range of F, and slowly; the direct routes give the minimum-norm answer instead.
    return f.damped is True


#: The routes ``auto`` chooses from, in order of preference on ties.
CANDIDATES = (
    Candidate(
        "cholesky", lambda f: f.dense_ok and f.damped is True, lambda f: _dense(f, RATE_CHOL)
    ),
    Candidate("pinv", lambda f: f.dense_ok, lambda f: _dense(f, RATE_EIGH)),
    Candidate("gram", lambda f: True, _gram),
    Candidate("gram_cg", _iterative_ok, _gram_cg),
    Candidate("pcg", _iterative_ok, _pcg),
    Candidate("cg", _iterative_ok, _cg),
)


def costs(facts: Facts, registered=None) -> dict:
    """``{name: estimated seconds}`` of the applicable, registered candidates."""
    if registered is None:
        from natchain._solvers import SOLVERS as registered
    return {c.name: c.cost(facts) for c in CANDIDATES if c.name in registered and c.applies(facts)}


def choose(facts: Facts, registered=None) -> str:
    """The name of the cheapest applicable route (see the module docstring)."""
    estimates = costs(facts, registered)
    return min(estimates, key=estimates.get)


@dataclasses.dataclass(frozen=True)
class Cover:
    """What the Gram route's per-layer structure covers (trace time)."""

    params: int = 0  # parameters covered
    sum_in: int = 0  # Σ input widths a of the covered matrix leaves
    sum_out: int = 0  # Σ output widths b of the covered leaves (a bias: its size)
    factored: int = 0  # parameters of the dense sites with a factored product (N < 2a)
    factored_in: int = 0  # Σa of those sites
    factored_out: int = 0  # Σb of those sites
    conv: bool = False  # a recognised convolution


def _widths(leaf) -> tuple[int, int]:
    if leaf.ndim >= 2:
        return math.prod(leaf.shape[:-1]), leaf.shape[-1]
    return 0, leaf.size


def _cover(problem) -> Cover:
    """The :class:`Cover` of ``problem``'s model (an empty one where nothing is found)."""
    import jax

    from natchain._gram import gram_sites
    from natchain._structure.dense import factored_product_pays

    params, n = problem.params, problem.batch_size
    try:
        _, structure, kept, _ = gram_sites(problem.model, params, problem.x, n)
    except Exception:  # noqa: BLE001 - no structure found: the Gram route materialises J
        return Cover()
    leaves = jax.tree_util.tree_leaves(params)
    fields = ("params", "sum_in", "sum_out", "factored", "factored_in", "factored_out")
    total = dict.fromkeys(fields, 0)
    for key in kept:
        site = structure.sites[key]
        widths = [_widths(leaves[i]) for i in site.leaves]
        size = sum(int(leaves[i].size) for i in site.leaves)
        a_in, b_out = sum(a for a, _ in widths), sum(b for _, b in widths)
        total["params"] += size
        total["sum_in"] += a_in
        total["sum_out"] += b_out
        # the dense pattern's own rule, with S = 1 row per example assumed here
        if site.pattern.name == "dense" and factored_product_pays(n, a_in):
            total["factored"] += size
            total["factored_in"] += a_in
            total["factored_out"] += b_out
    conv = any(site.pattern.name == "conv" for site in structure.sites.values())
    return Cover(**total, conv=conv)


def _forward_flops(problem) -> float | None:
    """XLA's flop count of one forward pass over the batch (``None`` where unavailable)."""
    import jax

    def spec(a):
        return jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))

    try:
        args = jax.tree_util.tree_map(spec, (problem.params, problem.x))
        analysis = jax.jit(problem.model).lower(*args).cost_analysis()
        flops = float(analysis["flops"])
    except Exception:  # noqa: BLE001 - no cost analysis on this backend: the dense estimate
        return None
    return flops if flops > 0 else None


def facts_of(problem, max_params=DEFAULT_MAX_PARAMS) -> Facts:
    """The :class:`Facts` of a :class:`natchain._problem.Problem`."""
    n, m, r = problem.factor.shape
    p = problem.num_params
    cover = _cover(problem)
    return Facts(
        n=n,
        m=m,
        r=r,
        p=p,
        bits=jnp.finfo(problem.flat.dtype).bits,
        damped=problem.damped,
        kind=problem.kind,
        structured=cover.params,
        gram_in=cover.sum_in,
        gram_out=cover.sum_out,
        factored=cover.factored,
        factored_in=cover.factored_in,
        factored_out=cover.factored_out,
        dense_ok=max_params is None or p <= max_params,
        conv=cover.conv,
        flops=_forward_flops(problem),
    )


class Auto(AbstractSolver):
    """The cheapest exact route for the problem's sizes, chosen at trace time.

    Chooses among ``"cholesky"``, ``"pinv"``, ``"gram"``, ``"gram_cg"``, ``"cg"`` (and
    ``"pcg"`` when it is registered) by the cost model of :mod:`natchain._solvers.auto`,
    runs it with its defaults and reports the choice as ``stats["route"]`` (an index into
    :data:`ROUTES`, listed in docs/statistics.md). The residual test is that of every solver.

    Args:
        max_params: the dense routes are considered only for ``P ≤ max_params``
            (``None``: always).
        tol, check_float64: the residual test, see :class:`AbstractSolver`.
    """

    name = "auto"

    def __init__(
        self,
        max_params: int | None = DEFAULT_MAX_PARAMS,
        tol: float | None = None,
        check_float64: bool = False,
    ):
        super().__init__(tol, check_float64)
        if max_params is not None and not (isinstance(max_params, int) and max_params >= 1):
            raise ValueError(f"max_params must be a positive integer or None; got {max_params!r}.")
        self.max_params = max_params

    def route(self, problem) -> str:
        """The name of the route chosen for ``problem``."""
        return choose(facts_of(problem, self.max_params))

    def chosen(self, problem):
        """``(name, solver)``: the route chosen for ``problem``, configured with its defaults."""
        from natchain._solvers import SOLVERS

        name = self.route(problem)
        options = {"tol": self.tol, "check_float64": self.check_float64}
        if name in ("pinv", "cholesky"):
            options["max_params"] = self.max_params
        return name, SOLVERS[name](**options)

    def compute(self, problem, damping):
        name, solver = self.chosen(problem)
        n, stats = solver.compute(problem, damping)
        return n, dict(stats, route=jnp.asarray(ROUTES.index(name), jnp.int32))

    def solve(self, problem, damping, prepared=None):
        """The chosen route's own :meth:`~AbstractSolver.solve` (its residual test, and
        whatever it adds to it, such as the Gram route's refinement on failure)."""
        if prepared is not None:
            return super().solve(problem, damping, prepared)  # refused: prepares nothing
        name, solver = self.chosen(problem)
        n, stats = solver.solve(problem, damping)
        return n, dict(stats, route=jnp.asarray(ROUTES.index(name), jnp.int32))
