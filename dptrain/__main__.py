"""``python -m dptrain`` is the ``dptrain`` command (also how an outside torchrun starts it)."""

from dptrain.cli import main

main()
