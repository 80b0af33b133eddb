"""How the agent reaches a database: TLS trust (:mod:`.tls`) and MemoryDB IAM login
(:mod:`.iam`). Shared by health probes and proxy sessions."""
