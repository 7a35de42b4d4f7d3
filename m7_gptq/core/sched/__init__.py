"""Scheduling: waiting and running queues, one decision per step. Introduced in M2."""
