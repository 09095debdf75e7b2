"""Held-out real English prose for perplexity: five licence texts every Debian machine has.

Debian's ``base-files`` package installs the full texts of common free
software licences in ``/usr/share/common-licenses``; they are on every
Debian (and Debian-based) machine without installing anything or going
online, nobody in this project wrote them, and they are long, formal
English prose. :data:`TEXTS` names five of them in a fixed order with their
SHA-256, so every run scores the same bytes; a missing, changed or
non-regular file is refused with one line naming it.

The caveat: these texts are all over the web, so a model pretrained on web
text has probably seen them (more than once). Their perplexity is lower than
that of unseen prose, and the data-type comparison measures how well each
4-bit type preserves what the model knows of them, not generalisation.

:func:`token_windows` cuts the token stream into fixed windows (stride =
window, the trailing partial window dropped), the evaluation the QLoRA paper
and most perplexity tables use (each window scored independently).
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

__all__ = ["TEXT_DIR", "TEXTS", "load_text", "token_windows"]

#: Where ``base-files`` installs the licence texts.
TEXT_DIR = Path("/usr/share/common-licenses")
#: (file name, SHA-256) in the order they are concatenated (Debian 12 base-files 12.4).
TEXTS = (
    ("GPL-3", "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986"),
    ("GPL-2", "8177f97513213526df2cf6184d8ff986c675afb514d4e68a404010521b880643"),
    ("LGPL-2.1", "dc626520dcd53a22f727af3ee42c770e56c97a64fe3adb063799d8ab032fe551"),
    ("Apache-2.0", "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"),
    ("MPL-2.0", "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85"),
)
#: Between two texts (so no token spans two licences).
SEPARATOR = "\n\n"


def load_text(directory: str | os.PathLike | None = None, texts=TEXTS) -> str:
    """The pinned texts, checked and joined by :data:`SEPARATOR` in the order of ``texts``.

    Raises
    ------
    ValueError
        One line naming the file that is missing, not a regular file (a
        symlink, a device, a folder) or whose SHA-256 differs from its pin.
    """
    folder = Path(directory) if directory is not None else TEXT_DIR
    parts = []
    for name, digest in texts:
        path = folder / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise ValueError(f"the held-out text {path} is missing (Debian's base-files installs "
                             "it)") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"the held-out text {path} is not a regular file")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"the held-out text {path} differs from the pinned one "
                             f"(SHA-256 {hashlib.sha256(data).hexdigest()}, expected {digest})")
        parts.append(data.decode("utf-8"))
    return SEPARATOR.join(parts)


def token_windows(tokenizer, text: str, window: int = 512, max_windows: int | None = None):
    """The token ids of ``text`` in non-overlapping windows: a ``(n_windows, window)`` LongTensor.

    No special tokens are added (the text is plain prose, not a chat). The
    trailing tokens that do not fill a window are dropped; ``max_windows``
    keeps the first windows only.
    """
    import torch

    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[:n * window], dtype=torch.long).reshape(n, window)  # (n, window)
