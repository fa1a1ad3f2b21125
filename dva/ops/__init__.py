"""Pure array functions (NumPy or CuPy through an `xp` module)."""
