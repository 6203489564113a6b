"""``python -m ddp``: the same as the ``ddp`` command."""

from ddp.cli import main
from ddp.group import run_process

run_process(main)
