"""Simulated data with known truth, for testing the engine against independent code."""
