"""`python -m relay` is the same as the `tls-relay` console script."""

from relay.cli import main

raise SystemExit(main())
