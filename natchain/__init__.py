"""natchain: the natural chain rule for JAX, beside the exact natural gradient.

Public names are re-exported here; every other module is private.
"""

from natchain import diagnostics
from natchain._checks import pick_output
from natchain._families import (
    AbstractFamily,
    Bernoulli,
    Categorical,
    Gaussian,
    GaussianHetero,
    Poisson,
)
from natchain._modular import (
    LocalMap,
    LocalStats,
    MapRecord,
    generic_rule,
    grad,
    layer,
    modular_trace,
    natural_vjp,
    register_rule,
    value_and_grad,
)
from natchain._natural_gradient import (
    Solution,
    fisher_matrix,
    fisher_vp,
    make_solver,
    natural_gradient,
)
from natchain._optim import NaturalGradientState, scale_by_natural_gradient
from natchain._problem import output_factor
from natchain._solvers import CG, SOLVERS, AbstractSolver, Cholesky, Gram, Pinv
from natchain._status import RESULTS, STAT_KEYS, SolverError, default_tol

__version__ = "0.1.0"

__all__ = [
    "AbstractFamily",
    "AbstractSolver",
    "Bernoulli",
    "CG",
    "Categorical",
    "Cholesky",
    "Gaussian",
    "GaussianHetero",
    "Gram",
    "NaturalGradientState",
    "Pinv",
    "RESULTS",
    "STAT_KEYS",
    "SolverError",
    "default_tol",
    "pick_output",
    "Poisson",
    "SOLVERS",
    "LocalMap",
    "LocalStats",
    "MapRecord",
    "Solution",
    "diagnostics",
    "fisher_matrix",
    "fisher_vp",
    "generic_rule",
    "grad",
    "layer",
    "make_solver",
    "modular_trace",
    "natural_gradient",
    "natural_vjp",
    "output_factor",
    "register_rule",
    "scale_by_natural_gradient",
    "value_and_grad",
]
