"""Triton kernels for the hot paths, installed as ``ldm_fast.kernels``."""
