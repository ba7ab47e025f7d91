"""Models trained by Jetbox workers (JEPA encoders, text encoder, HRM)."""
