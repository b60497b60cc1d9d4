"""`jaxreg evaluate` (placeholder until the metrics land)."""
