"""The display job: what users look at and use after a run (CryoSPARC's "3D Variability Display")."""
