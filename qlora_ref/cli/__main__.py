"""``python -m qlora_ref.cli`` (and ``torchrun -m qlora_ref.cli``) runs the command line, like ``python -m qlora_ref``."""
from . import main

if __name__ == "__main__":
    raise SystemExit(main())
