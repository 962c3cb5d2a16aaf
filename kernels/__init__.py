"""Triton kernels for ARES (the fused length head), each next to its torch reference."""
