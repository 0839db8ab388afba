"""Triton kernels shared across features. Each module imports triton itself, only when used."""
