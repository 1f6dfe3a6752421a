"""Pure data layer: AnnData I/O, the member data contract, harmonization, normalization, synthetic data.

Knows no torch and no nvflare.
"""
