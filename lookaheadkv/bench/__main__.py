"""`python -m lookaheadkv.bench ...`: the same as `lookaheadkv bench ...`, with one-line errors."""

import sys

import click

from ..errors import LookaheadKVError
from .command import bench

try:
    bench.main(args=sys.argv[1:], prog_name="lookaheadkv bench", standalone_mode=False)
except LookaheadKVError as e:
    click.echo(f"error: {e}", err=True)
    sys.exit(1)
except click.ClickException as e:
    e.show()
    sys.exit(e.exit_code)
