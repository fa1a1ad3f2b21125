"""`dva report`: plots, movies and one self-contained HTML page of a run (no GUI, no network)."""
