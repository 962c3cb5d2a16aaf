"""`python -m ares_router --prefill URL [BOOTSTRAP_PORT] --decode URL ... --policy ares --port N`."""

import sys

from ares_router.cli import main

sys.exit(main())
