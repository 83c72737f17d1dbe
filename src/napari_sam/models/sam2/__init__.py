"""SAM 2.1 (and MedSAM2) model code: Hiera encoder, memory, SAM 2 heads, tracking steps.

Attribute names equal the keys of Meta's ``sam2.1_hiera_*.pt`` checkpoints.
"""
