"""``python -m homeport``: the same as the ``homeport`` command."""

from homeport.cli import main

main()
