"""Readers and writers: RELION .star, CryoSPARC .cs, MRC/MRCS, the zarr particle store."""
