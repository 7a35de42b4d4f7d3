"""The core: which requests run in each step (M2), and which KV blocks hold them (M3)."""
