"""Attention: the one place where tokens look at each other. Introduced in M0."""
