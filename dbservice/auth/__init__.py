"""Identities for people and programs: the fleet CA, the login service and its client."""
