"""ulp layer (see DESIGN.md)."""
