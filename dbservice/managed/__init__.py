"""Managed MemoryDB users: passwords nobody sees, kept in Secrets Manager and rotated
by the agents (see docs/managed-users.md)."""
