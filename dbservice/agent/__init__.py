"""The database agent: serves the registry databases its label matchers select (plus
static ones from its config), health-checks them and announces them with heartbeats.

Layers: ``app`` (process supervisor) -> ``served`` (registry watch -> desired set) and
``supervisor`` (one worker per database) -> ``health`` and ``heartbeat`` -> ``config``.
"""
