"""natchain: the natural chain rule for JAX, beside the exact natural gradient.

Public names are re-exported here; every other module is private.
"""

from natchain import diagnostics
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
from natchain._modular._interpreter import StructureError, StructureWarning
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
from natchain._structure._inspect import LeafRow, StructureTable, inspect_structure

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
    "Poisson",
    "SOLVERS",
    "LeafRow",
    "LocalMap",
    "LocalStats",
    "MapRecord",
    "Solution",
    "StructureError",
    "StructureTable",
    "StructureWarning",
    "diagnostics",
    "fisher_matrix",
    "fisher_vp",
    "generic_rule",
    "grad",
    "inspect_structure",
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
