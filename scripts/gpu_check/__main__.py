"""``python scripts/gpu_check`` or ``python -m scripts.gpu_check``: the GPU check's driver."""
import sys
from pathlib import Path

if not __package__:  # run as a folder: import it as the package scripts.gpu_check
    _ROOT = Path(__file__).resolve().parents[2]
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(_ROOT)  # not the package's own folder: its modules are not top-level
    else:
        sys.path.insert(0, str(_ROOT))
    from scripts.gpu_check.cli import main
else:
    from .cli import main

sys.exit(main())
