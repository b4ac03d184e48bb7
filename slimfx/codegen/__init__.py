"""Kernels for the compressed ops. The CPU reference implementations live with the op definitions
(``slimfx/ir/ops.py``) so a compressed graph runs everywhere; GPU kernels register here for the same ops."""
