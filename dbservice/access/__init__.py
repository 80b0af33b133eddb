"""Who may do what, and the record of it: identities in certificates (:mod:`.ca`), roles
(:mod:`.rbac`, :mod:`.authorize`) and the audit (:mod:`.audit`). Shared by the agent, the
auth service and the laptop client."""
