"""How the modular rule behaves near saturated activations, and what the cut-off does."""
