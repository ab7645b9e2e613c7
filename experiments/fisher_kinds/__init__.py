"""Empirical vs true Fisher on linear regression with a known optimum."""
