"""``python -m fo_poller``: run the Finance & Operations poller until SIGINT/SIGTERM."""

from fo_poller.app import SERVICE
from servicekit.runtime import main

raise SystemExit(main(SERVICE))
