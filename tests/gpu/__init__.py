"""CUDA tests (see conftest.py: marked gpu, skipped without CUDA)."""
