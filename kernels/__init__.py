"""Triton kernels, installed as engine.kernels. They depend on torch and triton only."""
