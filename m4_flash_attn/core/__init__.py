"""The core: which requests run in each step, and which KV cache blocks hold them.

Introduced in M2; changed in M3 (the KV cache blocks).
"""
