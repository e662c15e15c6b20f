"""``python -m fo_poller``: run the Finance & Operations poller until SIGINT/SIGTERM.

It syncs every live ``dynamics-fo`` connection (``flash connections add --source dynamics-fo ...``, then
verify and go-live) and, with ``FLASH_FO_EVENTS_PORT`` set, serves the Business Events HTTPS receiver.
Settings: the ``FLASH_`` environment variables of the README; connection settings: ``fo_poller.config``.
"""

import argparse
import sys

if any(a in ("-h", "--help") for a in sys.argv[1:]):
    from fo_poller import app, config

    argparse.ArgumentParser(prog="python -m fo_poller", description=__doc__, epilog=(app.__doc__ or "")
                            + (config.__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter
                            ).print_help()
    raise SystemExit(0)

from fo_poller.app import SERVICE
from servicekit.runtime import main

raise SystemExit(main(SERVICE))
