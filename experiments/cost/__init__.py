"""How each route's per-step cost grows with batch size and width (ratios to SGD)."""
