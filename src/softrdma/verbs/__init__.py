"""verbs layer (see DESIGN.md)."""
