"""``python -m ce_poller``: run the Dynamics 365 Sales poller until SIGINT/SIGTERM."""

from ce_poller.app import SERVICE
from servicekit.runtime import main

raise SystemExit(main(SERVICE))
