"""fabric layer (see DESIGN.md)."""
