"""``python -m pyqlora``: the command line (the application's entry point, part of ``pyqlora.app``)."""
import sys

from .app.cli import main

sys.exit(main())
