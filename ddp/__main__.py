"""``python -m ddp``: the same as the ``ddp`` command."""

from ddp.cli import main
from ddp.group import exit_process

exit_process(main())
