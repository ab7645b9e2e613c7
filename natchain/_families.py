"""Output families: the distribution ``d(y | eta)`` a model's outputs parametrise.

Every method acts on **one example** — ``eta`` of shape ``(m,)`` and its target ``y`` —
and is batched with ``jax.vmap`` by the callers. Each family gives the closed-form
Fisher ``F_eta`` in its own parametrisation, a factor ``M`` with ``F = M Mᵀ``, and the
natural cotangent ``F⁺ g`` (its null space, where there is one, stated in the docstring).
"""

from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
import numpy as np

from natchain._checks import is_concrete

__all__ = [
    "AbstractFamily",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "GaussianHetero",
    "Poisson",
]


class AbstractFamily(abc.ABC):
    """A parametric output distribution ``d(y | eta)``.

    Args:
        dim: the output width ``m`` a model must produce per example; ``None`` accepts
            any width the family allows (checked by :meth:`check_output`).
    """

    #: ``True`` where ``F_eta`` is singular at every ``eta`` (softmax logits).
    singular_fisher: bool = False

    def __init__(self, dim: int | None = None):
        if dim is not None and (not isinstance(dim, int) or not self._width_ok(dim)):
            raise ValueError(f"{type(self).__name__}: dim={dim!r} is not {self._width_rule}.")
        self.dim = dim

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"

    # Families are configuration: equal when of the same type with the same settings, so
    # that they can be static arguments of ``jax.jit`` without needless recompilation.
    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    # ---- shapes and validation -------------------------------------------------------
    _width_rule = "a positive integer"

    def _width_ok(self, m: int) -> bool:
        return m >= 1

    def check_output(self, eta, name: str = "model output") -> None:
        """Raise ``ValueError`` unless ``eta`` is ``(N, m)`` with a width this family takes."""
        shape = tuple(eta.shape)
        if len(shape) != 2:
            raise ValueError(
                f"{name} must have shape (N, m) = (batch, {self._width_name()}) for "
                f"{self!r}; got shape {shape}."
            )
        m = shape[1]
        if (self.dim is not None and m != self.dim) or not self._width_ok(m):
            want = self.dim if self.dim is not None else self._width_rule
            raise ValueError(
                f"{name} has width m={m} but {self!r} expects {want} "
                f"({self._width_name()} per example)."
            )
        if not jnp.issubdtype(eta.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point; got dtype {eta.dtype}.")

    def _width_name(self) -> str:
        return "parameters"

    def target_shape(self, m: int) -> tuple[int, ...]:
        """Shape of one example's target for output width ``m``."""
        return (m,)

    def check_targets(self, y, eta, name: str = "y") -> None:
        """Raise ``ValueError`` when ``y`` does not fit ``eta`` (shape) or the support (values)."""
        n, m = eta.shape
        want = (n, *self.target_shape(m))
        if tuple(jnp.shape(y)) != want:
            raise ValueError(
                f"{name} must have shape {want} for {self!r} with model output shape {(n, m)}; "
                f"got {tuple(jnp.shape(y))}."
            )
        if is_concrete(y):
            self._check_support(np.asarray(y), name)

    def _check_support(self, y: np.ndarray, name: str) -> None:
        if not np.all(np.isfinite(y)):
            raise ValueError(f"{name} contains non-finite values.")

    # ---- the distribution -------------------------------------------------------------
    @abc.abstractmethod
    def nll(self, eta, y):
        """Negative log-likelihood ``-log d(y | eta)`` of one example."""

    @abc.abstractmethod
    def sample(self, key, eta, shape: tuple[int, ...] = ()):
        """Draw targets ``y ~ d(. | eta)`` with leading sample ``shape``."""

    @abc.abstractmethod
    def fisher(self, eta):
        """Closed-form Fisher ``E[s sᵀ]`` of the score ``s = ∇_eta log d(y | eta)``, ``(m, m)``."""

    @abc.abstractmethod
    def fisher_sqrt(self, eta):
        """A factor ``M`` (``(m, r)``) with ``fisher(eta) == M @ M.T``."""

    @abc.abstractmethod
    def natural_cotangent(self, eta, g):
        """``F_eta⁺ g``: the minimum-norm natural cotangent of the cotangent ``g``."""

    @abc.abstractmethod
    def kl(self, eta_p, eta_q):
        """``KL(d(. | eta_p) ‖ d(. | eta_q))``."""

    def score(self, eta, y):
        """``∇_eta log d(y | eta)``."""
        return -jax.grad(self.nll)(eta, y)

    def null_space(self, eta):
        """Orthonormal basis ``(m, k)`` of the null space of ``F_eta`` (``k = 0`` if none)."""
        return jnp.zeros((eta.shape[-1], 0), eta.dtype)


class Categorical(AbstractFamily):
    """Categorical over ``m`` classes, parametrised by logits; ``F = diag(p) − p pᵀ``.

    ``F`` is singular: the all-ones vector spans its null space (adding a constant to
    every logit changes nothing). A natural cotangent is therefore defined only up to
    that direction; ``representative`` selects which one :meth:`natural_cotangent`
    returns, and the choice changes a modular natural gradient:

    - ``"min_norm"`` (default): ``F⁺ g``, orthogonal to the all-ones vector;
    - ``"ratio"``: ``g̃ / p`` with ``g̃`` the centred cotangent (``diag(p)⁻¹`` applied as if
      the rank-one term were absent; it solves ``F x = g̃`` too);
    - ``"pin_last"``: the solution whose last entry is zero (the last logit held fixed).

    Args:
        dim: number of classes (``None``: any ``m ≥ 2``).
        representative: which solution of ``F x = g`` to return, as above.
    """

    singular_fisher = True
    representatives = ("min_norm", "ratio", "pin_last")
    _width_rule = "at least 2 classes"

    def __init__(self, dim: int | None = None, representative: str = "min_norm"):
        super().__init__(dim)
        if representative not in self.representatives:
            raise ValueError(
                f"Categorical: representative={representative!r} is not one of "
                f"{self.representatives}."
            )
        self.representative = representative

    def __repr__(self) -> str:
        rep = (
            "" if self.representative == "min_norm" else f", representative={self.representative!r}"
        )
        return f"Categorical(dim={self.dim}{rep})"

    def _width_ok(self, m):
        return m >= 2

    def _width_name(self):
        return "logits"

    def target_shape(self, m):
        return ()

    def _check_support(self, y, name):
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class labels; got dtype {y.dtype}.")

    def check_targets(self, y, eta, name="y"):
        n, m = eta.shape
        shape = tuple(jnp.shape(y))
        if shape == (n, m):
            raise ValueError(
                f"{name} has shape {shape}, like one-hot vectors; {self!r} expects class "
                f"indices of shape ({n},) (integers in 0, …, {m - 1}): pass "
                f"jnp.argmax({name}, axis=-1)."
            )
        dt = jnp.result_type(y)
        if not jnp.issubdtype(dt, jnp.integer):
            raise ValueError(
                f"{name} must hold integer class labels (class indices in 0, …, {m - 1}); "
                f"got dtype {dt}."
            )
        super().check_targets(y, eta, name)
        if is_concrete(y):
            m = eta.shape[1]
            y = np.asarray(y)
            bad = (y < 0) | (y >= m)
            if np.any(bad):
                raise ValueError(
                    f"{name} has labels outside the support {{0, …, {m - 1}}} of {self!r}: "
                    f"{np.unique(y[bad])[:5].tolist()}."
                )

    def nll(self, eta, y):
        return jax.nn.logsumexp(eta) - eta[y]

    def sample(self, key, eta, shape=()):
        return jax.random.categorical(key, eta, shape=shape)

    def fisher(self, eta):
        p = jax.nn.softmax(eta)
        return jnp.diag(p) - jnp.outer(p, p)

    def fisher_sqrt(self, eta):
        """A full-column-rank factor ``(m, m − 1)``: ``diag(√p) Q``.

        ``Q`` holds the first ``m − 1`` columns of the Householder reflection that maps
        ``√p`` to ``−e_m``: an orthonormal basis of ``√p⊥``. Since ``(diag(√p) − p√pᵀ)``
        (a square factor) annihilates ``√p``, ``diag(√p) Q`` is the same factor with the
        null direction removed, one column fewer for the Gram route to carry.
        """
        p = jax.nn.softmax(eta)
        s = jnp.sqrt(p)
        v = s.at[-1].add(1.0)
        q = jnp.eye(eta.shape[-1], dtype=eta.dtype) - jnp.outer(v, v) / v[-1]
        return s[:, None] * q[:, :-1]

    def natural_cotangent(self, eta, g):
        p = jax.nn.softmax(eta)
        g = g - jnp.mean(g)
        u = g / p
        if self.representative == "ratio":
            return u
        x = u - jnp.mean(u)
        if self.representative == "pin_last":
            return x - x[-1]
        return x

    def kl(self, eta_p, eta_q):
        lp = jax.nn.log_softmax(eta_p)
        lq = jax.nn.log_softmax(eta_q)
        return jnp.sum(jnp.exp(lp) * (lp - lq))

    def null_space(self, eta):
        m = eta.shape[-1]
        return jnp.full((m, 1), 1.0 / math.sqrt(m), eta.dtype)


class Bernoulli(AbstractFamily):
    """Independent Bernoulli variables parametrised by logits; ``F = diag(p (1 − p))``."""

    def _width_name(self):
        return "logits"

    def _check_support(self, y, name):
        super()._check_support(y, name)
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{name} must hold 0/1 targets for {self!r}.")

    def nll(self, eta, y):
        return jnp.sum(jax.nn.softplus(eta) - y * eta)

    def sample(self, key, eta, shape=()):
        p = jax.nn.sigmoid(eta)
        return jax.random.bernoulli(key, p, shape=(*shape, *eta.shape)).astype(eta.dtype)

    def fisher(self, eta):
        return jnp.diag(self._var(eta))

    def fisher_sqrt(self, eta):
        return jnp.diag(jnp.sqrt(self._var(eta)))

    def natural_cotangent(self, eta, g):
        return g / self._var(eta)

    def kl(self, eta_p, eta_q):
        p = jax.nn.sigmoid(eta_p)
        lp1, lp0 = jax.nn.log_sigmoid(eta_p), jax.nn.log_sigmoid(-eta_p)
        lq1, lq0 = jax.nn.log_sigmoid(eta_q), jax.nn.log_sigmoid(-eta_q)
        return jnp.sum(p * (lp1 - lq1) + (1 - p) * (lp0 - lq0))

    @staticmethod
    def _var(eta):
        return jax.nn.sigmoid(eta) * jax.nn.sigmoid(-eta)


class Gaussian(AbstractFamily):
    """Gaussian with mean ``eta`` and a fixed scale; ``F = I / scale²``.

    Args:
        dim: output width.
        scale: the fixed standard deviation (positive).
    """

    def __init__(self, dim: int | None = None, scale: float = 1.0):
        super().__init__(dim)
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"Gaussian: scale must be a positive finite number; got {scale!r}.")
        self.scale = float(scale)

    def __repr__(self):
        return f"Gaussian(dim={self.dim}, scale={self.scale})"

    def _width_name(self):
        return "means"

    def nll(self, eta, y):
        r = (y - eta) / self.scale
        m = eta.shape[-1]
        return 0.5 * jnp.sum(r * r) + m * (math.log(self.scale) + 0.5 * math.log(2 * math.pi))

    def sample(self, key, eta, shape=()):
        return eta + self.scale * jax.random.normal(key, (*shape, *eta.shape), eta.dtype)

    def fisher(self, eta):
        return jnp.eye(eta.shape[-1], dtype=eta.dtype) / self.scale**2

    def fisher_sqrt(self, eta):
        return jnp.eye(eta.shape[-1], dtype=eta.dtype) / self.scale

    def natural_cotangent(self, eta, g):
        return g * self.scale**2

    def kl(self, eta_p, eta_q):
        d = (eta_p - eta_q) / self.scale
        return 0.5 * jnp.sum(d * d)


class GaussianHetero(AbstractFamily):
    """Gaussian with mean and log-scale: ``eta = (mu, rho)``, ``sigma = exp(rho)``, ``m = 2k``.

    ``F = diag(1 / sigma², 2)`` (mean block, then log-scale block).
    """

    _width_rule = "an even number (k means, then k log-scales)"

    def _width_ok(self, m):
        return m >= 2 and m % 2 == 0

    def _width_name(self):
        return "means and log-scales"

    def target_shape(self, m):
        return (m // 2,)

    @staticmethod
    def _split(eta):
        k = eta.shape[-1] // 2
        return eta[..., :k], eta[..., k:]

    def nll(self, eta, y):
        mu, rho = self._split(eta)
        r = (y - mu) * jnp.exp(-rho)
        return jnp.sum(0.5 * r * r + rho + 0.5 * math.log(2 * math.pi))

    def sample(self, key, eta, shape=()):
        mu, rho = self._split(eta)
        return mu + jnp.exp(rho) * jax.random.normal(key, (*shape, *mu.shape), eta.dtype)

    def _diag(self, eta):
        _, rho = self._split(eta)
        return jnp.concatenate([jnp.exp(-2 * rho), jnp.full_like(rho, 2.0)])

    def fisher(self, eta):
        return jnp.diag(self._diag(eta))

    def fisher_sqrt(self, eta):
        return jnp.diag(jnp.sqrt(self._diag(eta)))

    def natural_cotangent(self, eta, g):
        return g / self._diag(eta)

    def kl(self, eta_p, eta_q):
        mp, rp = self._split(eta_p)
        mq, rq = self._split(eta_q)
        ratio = jnp.exp(2 * (rp - rq))
        return jnp.sum(rq - rp + 0.5 * (ratio + (mp - mq) ** 2 * jnp.exp(-2 * rq)) - 0.5)


class Poisson(AbstractFamily):
    """Independent Poisson counts parametrised by log-rates; ``F = diag(exp(eta))``."""

    def _width_name(self):
        return "log-rates"

    def _check_support(self, y, name):
        super()._check_support(y, name)
        if not np.all((y >= 0) & (y == np.round(y))):
            raise ValueError(f"{name} must hold non-negative integer counts for {self!r}.")

    def nll(self, eta, y):
        return jnp.sum(jnp.exp(eta) - y * eta + jax.scipy.special.gammaln(y + 1.0))

    def sample(self, key, eta, shape=()):
        y = jax.random.poisson(key, jnp.exp(eta), shape=(*shape, *eta.shape))
        return y.astype(eta.dtype)

    def fisher(self, eta):
        return jnp.diag(jnp.exp(eta))

    def fisher_sqrt(self, eta):
        return jnp.diag(jnp.exp(0.5 * eta))

    def natural_cotangent(self, eta, g):
        return g * jnp.exp(-eta)

    def kl(self, eta_p, eta_q):
        lp = jnp.exp(eta_p)
        return jnp.sum(lp * (eta_p - eta_q) - lp + jnp.exp(eta_q))
