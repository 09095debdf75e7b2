"""Compiled hot paths (Cython). Loops only: validation and dispatch live in Python.

Each kernel here has a readable NumPy twin named in its docstring, and a
test asserts that both give the same bytes. See :mod:`qlora_ref.backend`
for how a path is chosen.
"""
