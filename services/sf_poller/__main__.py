"""``python -m sf_poller``: run the Salesforce poller until SIGINT/SIGTERM."""

from servicekit.runtime import main
from sf_poller.app import SERVICE

raise SystemExit(main(SERVICE))
