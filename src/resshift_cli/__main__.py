"""``python -m resshift_cli``: the same as the ``resshift`` command (and what torchrun runs)."""

from resshift_cli.cli import main

main()
