"""The LAPACK/BLAS routines behind the spectra, called without holding Python's GIL.

scipy's own wrappers (``scipy.linalg.lapack``) keep the GIL during the Fortran call, so two Python threads cannot
decompose two matrices at once. These call the same routines of the same library (scipy's OpenBLAS, through the
function pointers that ``scipy.linalg.cython_blas`` / ``cython_lapack`` publish for exactly this kind of use)
through ctypes, which releases the GIL for the call. With one BLAS thread per call and one call per core, two
768 x 768 tridiagonal reductions run side by side: 17.6 ms per matrix instead of 28.4 ms for one at a time on two
BLAS threads (measured on the 2-core CI machine).

Every function takes float64 numpy arrays, checks shapes and layout, allocates its own outputs and raises
``numpy.linalg.LinAlgError`` on a LAPACK error code.
"""

from __future__ import annotations

import ctypes
from types import ModuleType

import numpy as np
from scipy.linalg import cython_blas, cython_lapack

_INT = ctypes.POINTER(ctypes.c_int)
_PTR = ctypes.c_void_p  # array data
_CHAR = ctypes.c_char_p
_DOUBLE = ctypes.POINTER(ctypes.c_double)

_name = ctypes.pythonapi.PyCapsule_GetName
_name.restype, _name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_pointer.restype, _pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def _routine(module: ModuleType, name: str, *argtypes: object) -> ctypes._CFuncPtr:
    capsule = module.__pyx_capi__[name]  # type: ignore[attr-defined]
    return ctypes.CFUNCTYPE(None, *argtypes)(_pointer(capsule, _name(capsule)))


_dgemm = _routine(
    cython_blas, "dgemm", _CHAR, _CHAR, _INT, _INT, _INT, _DOUBLE, _PTR, _INT, _PTR, _INT, _DOUBLE, _PTR, _INT
)
_dsyrk = _routine(cython_blas, "dsyrk", _CHAR, _CHAR, _INT, _INT, _DOUBLE, _PTR, _INT, _DOUBLE, _PTR, _INT)
_dsytrd = _routine(cython_lapack, "dsytrd", _CHAR, _INT, _PTR, _INT, _PTR, _PTR, _PTR, _PTR, _INT, _INT)
_dsterf = _routine(cython_lapack, "dsterf", _INT, _PTR, _PTR, _INT)
_dormqr = _routine(
    cython_lapack, "dormqr", _CHAR, _CHAR, _INT, _INT, _INT, _PTR, _INT, _PTR, _PTR, _INT, _PTR, _INT, _INT
)
_dsyevd = _routine(cython_lapack, "dsyevd", _CHAR, _CHAR, _INT, _PTR, _INT, _PTR, _PTR, _INT, _PTR, _INT, _INT)


def _i(value: int) -> ctypes.c_int:
    return ctypes.c_int(value)


def _data(x: np.ndarray) -> int:
    return x.ctypes.data


def _check(info: ctypes.c_int, routine: str) -> None:
    if info.value != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed (info={info.value}); is the matrix finite?")


def _square_f64(g: np.ndarray) -> np.ndarray:
    """A Fortran-ordered float64 copy of a square matrix (the routines overwrite their input)."""
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {g.shape}")
    return np.array(g, dtype=np.float64, order="F", copy=True)


def _blas_operand(x: np.ndarray) -> tuple[np.ndarray, bytes, int]:
    """x (rows x cols, float64) as BLAS reads it: column-major memory, a transpose flag, and its leading dimension."""
    if x.ndim != 2 or x.dtype != np.float64:
        raise ValueError(f"expected a 2-D float64 array, got {x.dtype} of shape {x.shape}")
    if x.flags.f_contiguous:
        return x, b"N", max(x.shape[0], 1)
    if x.flags.c_contiguous:  # its memory is x^T column-major
        return x, b"T", max(x.shape[1], 1)
    x = np.asfortranarray(x)
    return x, b"N", max(x.shape[0], 1)


def matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y for float64 matrices by dgemm (either operand may be a transposed view: no copy), column-major."""
    (a, ta, lda), (b, tb, ldb) = _blas_operand(x), _blas_operand(y)
    m, k = x.shape
    if y.shape[0] != k:
        raise ValueError(f"cannot multiply {x.shape} by {y.shape}")
    n = y.shape[1]
    c = np.zeros((m, n), order="F")
    if m and n and k:
        _dgemm(ta, tb, _i(m), _i(n), _i(k), ctypes.c_double(1.0), _data(a), _i(lda), _data(b), _i(ldb),
               ctypes.c_double(0.0), _data(c), _i(max(m, 1)))  # fmt: skip
    return c


def gram_lower(a: np.ndarray) -> np.ndarray:
    """a^T a (n x n) for a float64 (m x n) matrix by dsyrk: the lower triangle only (the upper one is zero)."""
    if a.ndim != 2 or a.dtype != np.float64:
        raise ValueError(f"expected a 2-D float64 array, got {a.dtype} of shape {a.shape}")
    m, n = a.shape
    if a.flags.f_contiguous:  # column-major a (m x n): C = A^T A
        trans, lda = b"T", max(m, 1)
    elif a.flags.c_contiguous:  # its memory is a^T (n x m) column-major: C = A A^T with A = a^T
        trans, lda = b"N", max(n, 1)
    else:
        a, trans, lda = np.asfortranarray(a), b"T", max(m, 1)
    c = np.zeros((n, n), order="F")
    alpha, beta = ctypes.c_double(1.0), ctypes.c_double(0.0)
    _dsyrk(b"L", trans, _i(n), _i(m), alpha, _data(a), _i(lda), beta, _data(c), _i(max(n, 1)))
    return c


class Tridiagonal:
    """g = Q T Q^T by dsytrd (lower triangle of g read): ``d``/``e`` the diagonal and subdiagonal of T,
    ``reflectors``/``tau`` the Householder vectors of Q as LAPACK stores them (below the subdiagonal)."""

    def __init__(self, g: np.ndarray) -> None:
        c = _square_f64(g)
        n = c.shape[0]
        self.d, self.e, self.tau = np.empty(n), np.empty(max(n - 1, 1)), np.empty(max(n - 1, 1))
        lwork = 64 * max(n, 1)
        work, info = np.empty(lwork), ctypes.c_int(0)
        _dsytrd(b"L", _i(n), _data(c), _i(max(n, 1)), _data(self.d), _data(self.e), _data(self.tau),
                _data(work), _i(lwork), ctypes.byref(info))  # fmt: skip
        _check(info, "dsytrd")
        self.n, self.reflectors = n, c
        self.e, self.tau = self.e[: n - 1], self.tau[: n - 1]

    def eigenvalues(self) -> np.ndarray:
        """All eigenvalues of T (= of g), ascending, by the root-free QR algorithm (dsterf)."""
        d, e, info = self.d.copy(), np.append(self.e, 0.0), ctypes.c_int(0)
        _dsterf(_i(self.n), _data(d), _data(e), ctypes.byref(info))
        _check(info, "dsterf")
        return d

    def apply_q(self, z: np.ndarray) -> np.ndarray:
        """Q @ z for z (n x k): eigenvectors of T become eigenvectors of g (dormqr on the stored reflectors).

        Q = diag(1, Q') where Q' is the product of the n - 1 reflectors stored from row 1 of ``reflectors``.
        """
        n = self.n
        out = np.array(z, dtype=np.float64, order="F", copy=True)
        if out.ndim != 2 or out.shape[0] != n:
            raise ValueError(f"expected {n} rows, got {out.shape}")
        k = out.shape[1]
        if n < 2 or k == 0:
            return out
        lwork, info = 64 * k, ctypes.c_int(0)
        work, step = np.empty(lwork), out.itemsize  # element (1, 0) of a column-major array: one item in
        _dormqr(b"L", b"N", _i(n - 1), _i(k), _i(n - 1), _data(self.reflectors) + step, _i(n), _data(self.tau),
                _data(out) + step, _i(n), _data(work), _i(lwork), ctypes.byref(info))  # fmt: skip
        _check(info, "dormqr")
        return out


def eigh(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (ascending) and eigenvectors (columns) of a symmetric g, lower triangle read (dsyevd)."""
    a = _square_f64(g)
    n = a.shape[0]
    w, info = np.empty(n), ctypes.c_int(0)
    lwork, liwork = 1 + 6 * n + 2 * n * n, 3 + 5 * n
    if lwork > np.iinfo(np.intc).max:
        raise ValueError(f"a {n} x {n} eigen-decomposition needs more workspace than 32-bit LAPACK can address")
    work, iwork = np.empty(lwork), np.empty(liwork, dtype=np.intc)
    _dsyevd(b"V", b"L", _i(n), _data(a), _i(max(n, 1)), _data(w), _data(work), _i(lwork), _data(iwork),
            _i(liwork), ctypes.byref(info))  # fmt: skip
    _check(info, "dsyevd")
    return w, a
