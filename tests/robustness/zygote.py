"""A parent process for kill tests: imports torch and qlora_ref once, then forks one child per run.

Each child runs ``qlora_ref.cli.main(argv)`` with its own environment and log,
and can be killed by its own pid; the imports (seconds of a fresh process)
are paid once. Used by ``tests/train/test_checkpoints.py`` (the tiny GPT) and
``tests/interop/test_hf_finetune.py`` (a Hugging Face model): they differ only in
what the parent imports first.

Protocol: the parent prints ``ready``; each line written to its stdin is a
JSON job ``{"argv": [...], "env": {...}, "log": PATH}``; for each it prints
``{"pid": PID, "code": EXIT_STATUS}`` once the child has ended.
"""

_SOURCE = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import matplotlib.figure  # noqa: F401
{imports}
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.environ.update(job["env"])
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = qlora_ref.cli.main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({{"pid": pid, "code": os.waitstatus_to_exitcode(status)}}), flush=True)
"""


def zygote_source(imports: str) -> str:
    """The parent's source for ``python -c``; ``imports`` are the modules it loads before forking."""
    return _SOURCE.format(imports=imports)
