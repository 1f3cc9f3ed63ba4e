"""`python -m lookaheadkv ...` (and `torchrun --nproc-per-node N -m lookaheadkv ...`): the command line."""

from .cli import main

main(prog_name="lookaheadkv")
