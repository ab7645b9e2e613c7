"""Training comparison: SGD, empirical/MC/exact natural gradient, modular natural gradient."""
