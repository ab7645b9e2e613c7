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
from natchain._sharding import GramRows
from natchain._solvers import (
    CG,
    PCG,
    SOLVERS,
    AbstractSolver,
    Auto,
    Cholesky,
    Gram,
    GramCG,
    Pinv,
)
from natchain._status import RESULTS, STAT_KEYS, SolverError, default_tol
from natchain._structure._inspect import LeafRow, StructureTable, inspect_structure

__version__ = "0.1.0"

__all__ = [
    "AbstractFamily",
    "AbstractSolver",
    "Auto",
    "Bernoulli",
    "Categorical",
    "CG",
    "Cholesky",
    "default_tol",
    "diagnostics",
    "fisher_matrix",
    "fisher_vp",
    "Gaussian",
    "GaussianHetero",
    "generic_rule",
    "grad",
    "Gram",
    "GramCG",
    "GramRows",
    "inspect_structure",
    "layer",
    "LeafRow",
    "LocalMap",
    "LocalStats",
    "make_solver",
    "MapRecord",
    "modular_trace",
    "natural_gradient",
    "natural_vjp",
    "NaturalGradientState",
    "output_factor",
    "PCG",
    "pick_output",
    "Pinv",
    "Poisson",
    "register_rule",
    "RESULTS",
    "scale_by_natural_gradient",
    "Solution",
    "SolverError",
    "SOLVERS",
    "STAT_KEYS",
    "StructureError",
    "StructureTable",
    "StructureWarning",
    "value_and_grad",
]
