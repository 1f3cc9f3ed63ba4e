"""`python -m lookaheadkv.bench ...`: the same as `lookaheadkv bench ...` (for machines without the entry point)."""

import sys

from ..cli import main

main(args=["bench", *sys.argv[1:]], prog_name="lookaheadkv")
