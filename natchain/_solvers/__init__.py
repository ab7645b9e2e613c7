"""Exact natural-gradient solvers, one small class per route, behind one interface."""

from natchain._solvers._base import AbstractSolver
from natchain._solvers.auto import Auto
from natchain._solvers.cg import CG, conjugate_gradient
from natchain._solvers.cholesky import Cholesky
from natchain._solvers.gram import Gram
from natchain._solvers.gram_cg import GramCG
from natchain._solvers.pcg import PCG
from natchain._solvers.pinv import Pinv

#: Solver names accepted by ``natural_gradient(..., solver=name)``.
SOLVERS = {cls.name: cls for cls in (Pinv, Cholesky, Gram, GramCG, CG, PCG, Auto)}

__all__ = [
    "AbstractSolver",
    "Auto",
    "CG",
    "Cholesky",
    "Gram",
    "GramCG",
    "PCG",
    "Pinv",
    "SOLVERS",
    "conjugate_gradient",
]
