"""Build script for the optional Cython extension ``qlora_ref._kernels.quant4``.

Metadata lives in pyproject.toml. This file only adds the extension:

* compiled with OpenMP (``-fopenmp``) when the compiler accepts it, else
  without it (``prange`` then runs serially);
* always with ``-ffp-contract=off`` so float32 ``a * b + c`` is not fused
  into an FMA (it would round once where NumPy rounds twice);
* ``QLORA_REF_NATIVE=1`` adds ``-march=native`` (opt-in, not portable);
* if Cython or a compiler is missing, the package installs without the
  extension and runs on the NumPy reference (``QLORA_REF_REQUIRE_CYTHON=1``
  turns that into an error, as CI does);
* ``QLORA_REF_DEBUG_CYTHON=1`` builds the *debug* extension: the Cython
  directives ``boundscheck=True, wraparound=True, cdivision=False,
  initializedcheck=True``, so that an out-of-range memoryview access in a
  kernel raises ``IndexError`` (and a division by zero ``ZeroDivisionError``)
  instead of reading or writing past an array. The C macro of the same name
  is defined too, and the module reports it as
  ``qlora_ref._kernels.quant4.DEBUG_BUILD``. The normal build uses the
  opposite directives (no checks, C division). Build and test it with::

      QLORA_REF_DEBUG_CYTHON=1 python setup.py build_ext --inplace
      python -c "from qlora_ref._kernels import quant4; assert quant4.DEBUG_BUILD"
      pytest tests/kernels tests/robustness/test_tampered_inputs.py
      python setup.py build_ext --inplace          # back to the normal build

  (``.ci/run`` does this after the full test run.) The debug C source is
  generated under ``build/cython-debug/``, apart from the normal one, and
  ``build_ext`` always recompiles, so switching flavours never leaves the
  other one's C file or extension in place. The directives are set here and
  not in the ``.pyx`` header, which would override them.
"""
import os
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

DEBUG_CYTHON = os.environ.get("QLORA_REF_DEBUG_CYTHON", "0") not in ("", "0")


def _compiler_accepts(compiler, flags) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=flags)
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    """Add OpenMP when available; fall back to a pure-Python install when the build fails."""

    def finalize_options(self):
        super().finalize_options()
        # the .so path is the same for both flavours: an up-to-date check by
        # timestamps could keep a debug extension after a normal build (or the reverse)
        self.force = True

    def build_extensions(self):
        omp = ["-fopenmp"] if self.compiler.compiler_type == "unix" else ["/openmp"]
        use_omp = os.environ.get("QLORA_REF_OPENMP", "1") != "0" and _compiler_accepts(self.compiler, omp)
        for ext in self.extensions:
            if self.compiler.compiler_type == "unix":
                ext.extra_compile_args += ["-O3", "-ffp-contract=off"]
                if os.environ.get("QLORA_REF_NATIVE") == "1":
                    ext.extra_compile_args.append("-march=native")
            if use_omp:
                ext.extra_compile_args += omp
                ext.extra_link_args += omp
        print(f"qlora_ref: building the {'DEBUG (bounds-checked) ' if DEBUG_CYTHON else ''}"
              f"Cython kernels {'with' if use_omp else 'without'} OpenMP")
        super().build_extensions()

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler: the NumPy reference still works
            if os.environ.get("QLORA_REF_REQUIRE_CYTHON"):
                raise
            print(f"qlora_ref: WARNING: the Cython extension was not built ({exc}); "
                  "the NumPy reference will be used", file=sys.stderr)


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        if os.environ.get("QLORA_REF_REQUIRE_CYTHON"):
            raise
        print("qlora_ref: WARNING: Cython not found; installing without the extension",
              file=sys.stderr)
        return []
    from setuptools import Extension

    # the directives of the fast build, or (QLORA_REF_DEBUG_CYTHON=1) every check on
    checks = DEBUG_CYTHON
    directives = {"language_level": 3, "boundscheck": checks, "wraparound": checks,
                  "initializedcheck": checks, "cdivision": not checks,
                  "show_performance_hints": not checks}  # the debug build is slow on purpose
    macros = [("QLORA_REF_DEBUG_CYTHON", "1")] if DEBUG_CYTHON else []
    ext = Extension("qlora_ref._kernels.quant4", ["qlora_ref/_kernels/quant4.pyx"],
                    define_macros=macros, include_dirs=["qlora_ref/_kernels"],  # lookup16.h
                    depends=["qlora_ref/_kernels/lookup16.h", "qlora_ref/_kernels/gemv4.h",
                             "qlora_ref/_kernels/checks.pxi", "qlora_ref/_kernels/decode_step.h",
                             "qlora_ref/_kernels/decode_step.pxi"])
    return cythonize([ext], compiler_directives=directives,
                     build_dir="build/cython-debug" if DEBUG_CYTHON else None)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
