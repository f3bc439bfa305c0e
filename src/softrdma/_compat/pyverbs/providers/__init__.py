"""Vendor providers' direct verbs, as stand-ins: softrdma's devices belong to no vendor."""
