"""Tests of the upper-layer protocols (softrdma.ulp)."""
