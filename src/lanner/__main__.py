"""``python -m lanner`` is the ``lanner`` command."""

from lanner.cli import console_main

console_main()
