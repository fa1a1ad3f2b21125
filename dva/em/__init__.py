"""The 3DVA model: mean reconstruction, E-step, M-step and finish (pure array functions)."""
