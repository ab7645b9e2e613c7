"""Natural rules, one file per family of primitives; importing this package registers them."""

from natchain._modular._rules import (  # noqa: F401
    conv,
    elementwise,
    linear,
    structural,
    window,
)
