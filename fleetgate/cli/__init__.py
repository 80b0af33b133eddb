"""The ``fleetgate`` command: :mod:`.main` builds the parser from one module per command
group (:mod:`.db`, :mod:`.auth`, :mod:`.agent`, ...); :mod:`.errors` holds what they share.
"""

from fleetgate.cli.main import main

__all__ = ["main"]
