"""Triton code generation: kernels specialized from matched attention sites, and their launchers."""
