"""The only part of dva that knows dask: clusters, the iteration loop and tree reductions."""
