"""Agreement of the modular natural gradient with the exact one across model choices."""
