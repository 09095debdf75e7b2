"""``python -m qlora_ref`` runs the command line (see :mod:`qlora_ref.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
