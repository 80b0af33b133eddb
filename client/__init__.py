"""The laptop side: log in for a short-lived certificate (:mod:`.login`), the identity
files and the auth service's catalog (:mod:`.people`), and the ``db connect`` tunnel
(:mod:`.connect`). It imports no server code: only the bus records, the identity format
(``dbservice.access.ca``) and the route protocol (``dbservice.route``)."""
