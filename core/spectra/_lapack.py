"""The LAPACK/BLAS routines behind the spectra, called without holding Python's GIL where that is safe.

scipy's own wrappers (``scipy.linalg.lapack``) keep the GIL during the Fortran call, so two Python threads cannot
decompose two matrices at once. The fast path calls the same routines of the same library (scipy's BLAS, through
the function pointers that ``scipy.linalg.cython_blas`` / ``cython_lapack`` publish for exactly this kind of use)
through ctypes, which releases the GIL for the call: with one BLAS thread per call and one call per core, two
matrices are reduced side by side (``bench/bench_spectra.py`` measures the result).

ctypes cannot see a C prototype, so the fast path is taken only where it is known to match: on Linux, with a
32-bit C ``int``, scipy built without 64-bit-integer BLAS, and each routine's published signature (the capsule's
name, e.g. ``void (char *, int *, ..., __pyx_t_5scipy_6linalg_11cython_blas_d *, int *)``) exactly the argument
types declared here. Anywhere else the same routines run through scipy's wrappers (``fast_path()`` is False
and ``FALLBACK_REASON`` says why; the tridiagonal's eigenvectors by scipy's MRRR, there being no wrapper of
dstedc): same results to rounding, but one call at a time.

Every function takes float64 numpy arrays, checks shapes and layout, allocates its own outputs and raises
``numpy.linalg.LinAlgError`` on a LAPACK error code.
"""

from __future__ import annotations

import ctypes
import re
import sys
from typing import NamedTuple

import numpy as np
import scipy
import scipy.linalg
from scipy.linalg import blas as scipy_blas
from scipy.linalg import lapack as scipy_lapack

# ----------------------------------------------------------------------------------------------------------------
# The fast path: ctypes on scipy's Cython BLAS/LAPACK capsules
# ----------------------------------------------------------------------------------------------------------------
_CHAR = ctypes.c_char_p
_INT = ctypes.POINTER(ctypes.c_int)
_DOUBLE = ctypes.POINTER(ctypes.c_double)
_ARRAY = ctypes.c_void_p  # the data of a float64 array (double *), passed as an address


class _IntArray(ctypes.c_void_p):
    """The data of an int32 array (int *), passed as an address."""


# How each ctypes argument type reads in a capsule's signature (scipy's ``d`` is its typedef of double).
_DOUBLE_POINTER = r"__pyx_t_\w+_d \*"
_SIGNATURE_PATTERN = {_CHAR: r"char \*", _INT: r"int \*", _IntArray: r"int \*", _DOUBLE: _DOUBLE_POINTER,
                      _ARRAY: _DOUBLE_POINTER}  # fmt: skip

_ROUTINE_ARGUMENTS: dict[str, tuple[str, tuple[object, ...]]] = {
    "dgemm": ("blas", (_CHAR, _CHAR, _INT, _INT, _INT, _DOUBLE, _ARRAY, _INT, _ARRAY, _INT, _DOUBLE, _ARRAY, _INT)),
    "dsyrk": ("blas", (_CHAR, _CHAR, _INT, _INT, _DOUBLE, _ARRAY, _INT, _DOUBLE, _ARRAY, _INT)),
    "dsyr2k": ("blas", (_CHAR, _CHAR, _INT, _INT, _DOUBLE, _ARRAY, _INT, _ARRAY, _INT, _DOUBLE, _ARRAY, _INT)),
    "dsytrd": ("lapack", (_CHAR, _INT, _ARRAY, _INT, _ARRAY, _ARRAY, _ARRAY, _ARRAY, _INT, _INT)),
    "dsterf": ("lapack", (_INT, _ARRAY, _ARRAY, _INT)),
    "dstedc": ("lapack", (_CHAR, _INT, _ARRAY, _ARRAY, _ARRAY, _INT, _ARRAY, _INT, _IntArray, _INT, _INT)),
    "dormqr": ("lapack", (_CHAR, _CHAR, _INT, _INT, _INT, _ARRAY, _INT, _ARRAY, _ARRAY, _INT, _ARRAY, _INT, _INT)),
    "dstein": (
        "lapack",
        (_INT, _ARRAY, _ARRAY, _INT, _ARRAY, _IntArray, _IntArray, _ARRAY, _INT, _ARRAY, _IntArray, _IntArray, _INT),
    ),  # fmt: skip
    "dsyevd": ("lapack", (_CHAR, _CHAR, _INT, _ARRAY, _INT, _ARRAY, _ARRAY, _INT, _IntArray, _INT, _INT)),
}


class _Routines(NamedTuple):
    dgemm: ctypes._CFuncPtr
    dsyrk: ctypes._CFuncPtr
    dsyr2k: ctypes._CFuncPtr
    dsytrd: ctypes._CFuncPtr
    dsterf: ctypes._CFuncPtr
    dstedc: ctypes._CFuncPtr
    dormqr: ctypes._CFuncPtr
    dstein: ctypes._CFuncPtr
    dsyevd: ctypes._CFuncPtr


def signature_matches(signature: str, argtypes: tuple[object, ...]) -> bool:
    """Whether a capsule's C signature (``void (char *, int *, ...)``) takes exactly ``argtypes``, in order."""
    match = re.fullmatch(r"void \((.*)\)", signature.strip())
    if match is None:
        return False
    params = [p.strip() for p in match.group(1).split(",")]
    return len(params) == len(argtypes) and all(
        re.fullmatch(_SIGNATURE_PATTERN[t], p) is not None for t, p in zip(argtypes, params, strict=True)
    )


def _blas_uses_64bit_integers() -> bool:
    """Whether scipy reports a BLAS or LAPACK built with 64-bit integers (ILP64); unknown counts as yes."""
    try:
        dependencies = scipy.show_config(mode="dicts")["Build Dependencies"]
        return any(bool(dependencies[lib].get("has ilp64", True)) for lib in ("blas", "lapack"))
    except Exception:  # an older or unusual build without the dict: do not guess
        return True


def _load_fast_routines() -> tuple[_Routines | None, str | None]:
    """The ctypes routines, or None and the reason they are not safe to call here."""
    if not sys.platform.startswith("linux"):
        return None, f"platform {sys.platform} (the fast path is checked on Linux only)"
    if ctypes.sizeof(ctypes.c_int) != 4:
        return None, f"C int of {ctypes.sizeof(ctypes.c_int)} bytes"
    if _blas_uses_64bit_integers():
        return None, "scipy's BLAS/LAPACK is not reported as LP64 (32-bit integers)"
    try:
        from scipy.linalg import cython_blas, cython_lapack

        modules = {"blas": cython_blas, "lapack": cython_lapack}
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        routines = {}
        for name, (library, argtypes) in _ROUTINE_ARGUMENTS.items():
            capsule = modules[library].__pyx_capi__[name]
            signature = get_name(capsule)
            if not signature_matches(signature.decode(), argtypes):
                return None, f"{name}'s signature {signature.decode()!r} differs from the declared argument types"
            routines[name] = ctypes.CFUNCTYPE(None, *argtypes)(get_pointer(capsule, signature))
    except (ImportError, AttributeError, KeyError, ValueError, UnicodeDecodeError) as error:
        return None, f"scipy's Cython BLAS/LAPACK capsules are not readable ({error!r})"
    return _Routines(**routines), None


_FAST, FALLBACK_REASON = _load_fast_routines()


def fast_path() -> bool:
    """Whether the routines run through the checked ctypes fast path (else ``FALLBACK_REASON`` says why not)."""
    return _FAST is not None


def _c_int(value: int) -> ctypes.c_int:
    return ctypes.c_int(value)


def _data(x: np.ndarray) -> int:
    return x.ctypes.data


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed (info={info}); is the matrix finite?")


# ----------------------------------------------------------------------------------------------------------------
# The routines (fast path, else scipy's wrappers)
# ----------------------------------------------------------------------------------------------------------------
def _square_f64(g: np.ndarray) -> np.ndarray:
    """A Fortran-ordered float64 copy of a square matrix (the routines overwrite their input)."""
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {g.shape}")
    return np.array(g, dtype=np.float64, order="F", copy=True)


def _blas_operand(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """x (rows x cols, float64) as BLAS reads it: column-major memory holding x, or x^T when the flag is True."""
    if x.ndim != 2 or x.dtype != np.float64:
        raise ValueError(f"expected a 2-D float64 array, got {x.dtype} of shape {x.shape}")
    if x.flags.f_contiguous:
        return x, False
    if x.flags.c_contiguous:  # its memory is x^T column-major
        return x, True
    return np.asfortranarray(x), False


def matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y for float64 matrices by dgemm (either operand may be a transposed view: no copy), column-major."""
    (a, transpose_a), (b, transpose_b) = _blas_operand(x), _blas_operand(y)
    m, k = x.shape
    if y.shape[0] != k:
        raise ValueError(f"cannot multiply {x.shape} by {y.shape}")
    n = y.shape[1]
    if not (m and n and k):
        return np.zeros((m, n), order="F")
    if _FAST is None:  # scipy's wrapper reads the Fortran view (a.T of a C-ordered array) without a copy
        return scipy_blas.dgemm(
            1.0, a.T if transpose_a else a, b.T if transpose_b else b, trans_a=transpose_a, trans_b=transpose_b
        )
    lda = max(x.shape[1] if transpose_a else x.shape[0], 1)
    ldb = max(y.shape[1] if transpose_b else y.shape[0], 1)
    c = np.zeros((m, n), order="F")
    _FAST.dgemm(b"T" if transpose_a else b"N", b"T" if transpose_b else b"N", _c_int(m), _c_int(n), _c_int(k),
                ctypes.c_double(1.0), _data(a), _c_int(lda), _data(b), _c_int(ldb), ctypes.c_double(0.0), _data(c),
                _c_int(max(m, 1)))  # fmt: skip
    return c


def gram_lower(a: np.ndarray) -> np.ndarray:
    """a^T a (n x n) for a float64 (m x n) matrix by dsyrk: the lower triangle only (the upper one is zero)."""
    if a.ndim != 2 or a.dtype != np.float64:
        raise ValueError(f"expected a 2-D float64 array, got {a.dtype} of shape {a.shape}")
    m, n = a.shape
    if not a.flags.f_contiguous and not a.flags.c_contiguous:
        a = np.asfortranarray(a)
    # column-major a (m x n): C = A^T A; a C-ordered a is a^T (n x m) in column-major memory: C = A A^T
    transpose = a.flags.f_contiguous
    if _FAST is None:
        if m == 0:
            return np.zeros((n, n), order="F")
        return np.tril(scipy_blas.dsyrk(1.0, a if transpose else a.T, trans=int(transpose), lower=1))
    lda = max(m if transpose else n, 1)
    c = np.zeros((n, n), order="F")
    _FAST.dsyrk(b"L", b"T" if transpose else b"N", _c_int(n), _c_int(m), ctypes.c_double(1.0), _data(a),
                _c_int(lda), ctypes.c_double(0.0), _data(c), _c_int(max(n, 1)))  # fmt: skip
    return c


def symmetric_rank_2k_lower(w: np.ndarray, z: np.ndarray) -> np.ndarray:
    """w z^T + z w^T (n x n) for float64 (n x k) matrices by dsyr2k: the lower triangle only (the upper one is zero).

    Meant for thin operands (k << n): they are copied to column-major order.
    """
    if w.shape != z.shape or w.ndim != 2 or w.dtype != np.float64 or z.dtype != np.float64:
        raise ValueError(f"expected two float64 matrices of one shape, got {w.shape} and {z.shape}")
    w, z = np.asfortranarray(w), np.asfortranarray(z)
    n, k = w.shape
    if k == 0:
        return np.zeros((n, n), order="F")
    if _FAST is None:
        return np.tril(scipy_blas.dsyr2k(1.0, w, z, lower=1))
    c = np.zeros((n, n), order="F")
    _FAST.dsyr2k(b"L", b"N", _c_int(n), _c_int(k), ctypes.c_double(1.0), _data(w), _c_int(max(n, 1)), _data(z),
                 _c_int(max(n, 1)), ctypes.c_double(0.0), _data(c), _c_int(max(n, 1)))  # fmt: skip
    return c


class Tridiagonal:
    """g = Q T Q^T by dsytrd (lower triangle of g read): ``d``/``e`` the diagonal and subdiagonal of T,
    ``reflectors``/``tau`` the Householder vectors of Q as LAPACK stores them (below the subdiagonal)."""

    def __init__(self, g: np.ndarray) -> None:
        c = _square_f64(g)
        n = c.shape[0]
        lwork = 64 * max(n, 1)
        if _FAST is None:
            c, self.d, self.e, self.tau, info = scipy_lapack.dsytrd(c, lower=1, lwork=lwork, overwrite_a=1)
            _check(info, "dsytrd")
        else:
            self.d, self.e, self.tau = np.empty(n), np.empty(max(n - 1, 1)), np.empty(max(n - 1, 1))
            work, info = np.empty(lwork), ctypes.c_int(0)
            _FAST.dsytrd(b"L", _c_int(n), _data(c), _c_int(max(n, 1)), _data(self.d), _data(self.e),
                         _data(self.tau), _data(work), _c_int(lwork), ctypes.byref(info))  # fmt: skip
            _check(info.value, "dsytrd")
        self.n, self.reflectors = n, c
        self.e, self.tau = self.e[: n - 1], self.tau[: n - 1]
        self._values: np.ndarray | None = None

    def eigenvalues(self) -> np.ndarray:
        """All eigenvalues of T (= of g), ascending, by the root-free QR algorithm (dsterf); kept for later calls."""
        if self._values is None:
            if self.n < 2:
                self._values = self.d.copy()
            elif _FAST is None:
                self._values, info = scipy_lapack.dsterf(self.d, self.e)
                _check(info, "dsterf")
            else:
                d, e, info = self.d.copy(), np.append(self.e, 0.0), ctypes.c_int(0)
                _FAST.dsterf(_c_int(self.n), _data(d), _data(e), ctypes.byref(info))
                _check(info.value, "dsterf")
                self._values = d
        return self._values.copy()

    def splits(self) -> bool:
        """Whether T falls apart into blocks: an off-diagonal entry negligible against its neighbours on the
        diagonal, e_i^2 <= ulp^2 |d_i d_i+1| + safemin (the test dstebz splits T by)."""
        ulp, safemin = np.finfo(np.float64).eps, np.finfo(np.float64).tiny
        return bool(np.any(np.square(self.e) <= ulp**2 * np.abs(self.d[:-1] * self.d[1:]) + safemin))

    def leading_vectors(self, m: int) -> np.ndarray:
        """The eigenvectors of g for its ``m`` largest eigenvalues, descending, as columns (n x m).

        T's are found by inverse iteration (dstein) at the eigenvalues ``eigenvalues`` gives, then Q is applied to
        them alone (dormqr). dstein wants the eigenvalues of each block of T apart: where T splits, which block an
        eigenvalue belongs to is found by bisection instead (dstebz, through scipy's ``eigh_tridiagonal``).
        """
        n = self.n
        if m == 0:
            return np.zeros((n, 0), order="F")
        if n < 2 or self.splits():
            t = scipy.linalg.eigh_tridiagonal(
                self.d, self.e, select="i", select_range=(n - m, n - 1), check_finite=False
            )[1]
            return self.apply_q(t[:, ::-1])
        w = self.eigenvalues()[n - m :]
        block, split = np.ones(n, dtype=np.intc), np.full(n, n, dtype=np.intc)  # one block: rows 1..n
        if _FAST is None:
            t, info = scipy_lapack.dstein(self.d, self.e, w, block, split)
            _check(info, "dstein")
        else:
            t, e, info = np.zeros((n, m), order="F"), np.append(self.e, 0.0), ctypes.c_int(0)
            work, iwork, fail = np.empty(5 * n), np.empty(n, dtype=np.intc), np.empty(m, dtype=np.intc)
            _FAST.dstein(_c_int(n), _data(self.d), _data(e), _c_int(m), _data(w), _data(block),
                         _data(split), _data(t), _c_int(n), _data(work), _data(iwork), _data(fail),
                         ctypes.byref(info))  # fmt: skip
            _check(info.value, "dstein")
        return self.apply_q(t[:, ::-1])

    def eigenvectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All eigenvalues of T, ascending, and all its eigenvectors (columns, n x n), by divide and conquer (dstedc,
        the tridiagonal solver inside dsyevd); scipy's ``eigh_tridiagonal`` (MRRR) without the fast path.

        Q is not applied: with ``apply_q`` the eigenvectors of g are Q Z, formed only for the columns needed.
        """
        n = self.n
        if n < 2:
            return self.d.copy(), np.ones((n, n), order="F")
        if _FAST is None:
            return scipy.linalg.eigh_tridiagonal(self.d, self.e, check_finite=False)
        d, e, z = self.d.copy(), np.append(self.e, 0.0), np.zeros((n, n), order="F")
        lwork, liwork = 1 + 4 * n + n * n, 3 + 5 * n
        work, iwork, info = np.empty(lwork), np.empty(liwork, dtype=np.intc), ctypes.c_int(0)
        _FAST.dstedc(b"I", _c_int(n), _data(d), _data(e), _data(z), _c_int(n), _data(work), _c_int(lwork),
                     _data(iwork), _c_int(liwork), ctypes.byref(info))  # fmt: skip
        _check(info.value, "dstedc")
        return d, z

    def apply_q(self, z: np.ndarray, transpose: bool = False) -> np.ndarray:
        """Q @ z, or Q^T @ z with ``transpose``, for z (n x k): eigenvectors of T become eigenvectors of g and back
        (dormqr on the stored reflectors).

        Q = diag(1, Q') where Q' is the product of the n - 1 reflectors stored from row 1 of ``reflectors``.
        """
        n = self.n
        out = np.array(z, dtype=np.float64, order="F", copy=True)
        if out.ndim != 2 or out.shape[0] != n:
            raise ValueError(f"expected {n} rows, got {out.shape}")
        k = out.shape[1]
        if n < 2 or k == 0:
            return out
        lwork, trans = 64 * k, "T" if transpose else "N"
        if _FAST is None:
            reflectors = self.reflectors[1:, : n - 1]
            out[1:], _, info = scipy_lapack.dormqr("L", trans, reflectors, self.tau, out[1:], lwork)
            _check(info, "dormqr")
            return out
        work, info, step = np.empty(lwork), ctypes.c_int(0), out.itemsize  # (1, 0) of a column-major array
        _FAST.dormqr(b"L", trans.encode(), _c_int(n - 1), _c_int(k), _c_int(n - 1), _data(self.reflectors) + step,
                     _c_int(n), _data(self.tau), _data(out) + step, _c_int(n), _data(work), _c_int(lwork),
                     ctypes.byref(info))  # fmt: skip
        _check(info.value, "dormqr")
        return out


def eigh(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (ascending) and eigenvectors (columns) of a symmetric g, lower triangle read (dsyevd)."""
    a = _square_f64(g)
    n = a.shape[0]
    if _FAST is None:
        return scipy.linalg.eigh(a, lower=True, driver="evd", overwrite_a=True, check_finite=False)
    w, info = np.empty(n), ctypes.c_int(0)
    lwork, liwork = 1 + 6 * n + 2 * n * n, 3 + 5 * n
    if lwork > np.iinfo(np.intc).max:
        raise ValueError(f"a {n} x {n} eigen-decomposition needs more workspace than 32-bit LAPACK can address")
    work, iwork = np.empty(lwork), np.empty(liwork, dtype=np.intc)
    _FAST.dsyevd(b"V", b"L", _c_int(n), _data(a), _c_int(max(n, 1)), _data(w), _data(work), _c_int(lwork),
                 _data(iwork), _c_int(liwork), ctypes.byref(info))  # fmt: skip
    _check(info.value, "dsyevd")
    return w, a
