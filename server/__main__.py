"""`python -m server` is `gorgon serve` (and `python -m server train-heads ...` trains heads)."""
import sys

from server.cli import main

sys.exit(main())
