"""``python -m cdc_listener``: run the Salesforce CDC listener until SIGINT/SIGTERM."""

from cdc_listener.app import SERVICE
from servicekit.runtime import main

raise SystemExit(main(SERVICE))
