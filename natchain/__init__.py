"""natchain: the natural chain rule for JAX, beside the exact natural gradient.

Public names are re-exported here; every other module is private.
"""

from natchain._families import (
    AbstractFamily,
    Bernoulli,
    Categorical,
    Gaussian,
    GaussianHetero,
    Poisson,
)
from natchain._natural_gradient import (
    Solution,
    fisher_matrix,
    fisher_vp,
    make_solver,
    natural_gradient,
)
from natchain._problem import output_factor
from natchain._solvers import CG, SOLVERS, AbstractSolver, Cholesky, Gram, Pinv

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
    "Pinv",
    "Poisson",
    "SOLVERS",
    "Solution",
    "fisher_matrix",
    "fisher_vp",
    "make_solver",
    "natural_gradient",
    "output_factor",
]
