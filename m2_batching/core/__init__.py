"""The core: deciding which requests run in each step. Introduced in M2."""
