"""The Volume: an ``xarray.DataArray`` with dims ``("z", "y", "x")``.

A Volume carries its geometry so that nothing is lost between files:

* ``data``: float32, numpy- or dask-backed;
* coordinates ``z, y, x``: voxel centres in Å, ``origin + index * voxel_size``;
* ``attrs["voxel_size"]``: ``(vz, vy, vx)`` in Å (floats);
* ``attrs["origin"]``: ``(oz, oy, ox)`` in Å, the position of voxel (0, 0, 0);
* ``attrs["header"]`` (optional): file-format facts that have no meaning in the
  array model but must survive a round trip (MRC ``nstart``, axis order,
  cell, space group, labels, mode...). See :mod:`chunkem.io.mrc`.

Functions here make, check and copy Volumes; they never compute dask arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from .errors import DataValueError, GeometryError, ParameterError

__all__ = [
    "DIMS",
    "make_volume",
    "validate_volume",
    "like",
    "computed_header",
    "voxel_size",
    "origin",
    "check_aligned",
    "check_independent",
    "as_triple",
    "is_lazy",
]

DIMS = ("z", "y", "x")


def as_triple(value: float | Sequence[float], what: str = "value") -> tuple[float, float, float]:
    """Return ``value`` as a (z, y, x) tuple of floats (a scalar is repeated)."""
    if np.ndim(value) == 0:
        v = float(value)  # type: ignore[arg-type]
        return (v, v, v)
    vals = tuple(float(v) for v in value)  # type: ignore[union-attr]
    if len(vals) != 3:
        raise ParameterError(f"{what} must be a number or 3 numbers (z, y, x), got {value!r}")
    return vals  # type: ignore[return-value]


def _check_voxel_size(vs: tuple[float, float, float], source: str | None) -> None:
    where = f"{source}: " if source else ""
    for v in vs:
        if not math.isfinite(v) or v <= 0:
            raise ParameterError(
                f"{where}voxel size must be positive and finite in Å, got {vs} "
                "(a zero cell in an MRC header? pass voxel_size= to override)"
            )


def make_volume(
    data: Any,
    *,
    voxel_size: float | Sequence[float],
    origin: float | Sequence[float] = 0.0,
    name: str | None = None,
    header: dict | None = None,
    attrs: dict | None = None,
) -> xr.DataArray:
    """Make a Volume from a 3-D numpy or dask array.

    Parameters
    ----------
    data
        3-D array in (z, y, x) order; converted to float32 (lazily for dask).
    voxel_size
        Voxel size in Å, one number or (vz, vy, vx).
    origin
        Position in Å of the centre of voxel (0, 0, 0), one number or
        (oz, oy, ox).
    name
        Name of the DataArray (usually the file stem).
    header
        File-format facts to keep for a lossless round trip.
    attrs
        Extra attributes.

    Returns
    -------
    xarray.DataArray
        dims ``("z", "y", "x")``, coordinates in Å.

    Examples
    --------
    >>> import numpy as np
    >>> v = make_volume(np.zeros((4, 5, 6)), voxel_size=1.5, origin=(0, 0, 3.0))
    >>> v.dims, v.attrs["voxel_size"], float(v.x[0])
    (('z', 'y', 'x'), (1.5, 1.5, 1.5), 3.0)
    """
    if isinstance(data, xr.DataArray):
        data = data.data
    if not isinstance(data, da.Array):
        data = np.asarray(data)
    if data.ndim != 3:
        raise GeometryError(f"a Volume must be 3-D (z, y, x), got shape {tuple(data.shape)}")
    if any(n == 0 for n in data.shape):
        raise GeometryError(f"a Volume must not be empty, got shape {tuple(data.shape)}")
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    vs = as_triple(voxel_size, "voxel_size")
    _check_voxel_size(vs, name)
    org = as_triple(origin, "origin")
    coords = {
        d: np.float64(o) + np.arange(n, dtype=np.float64) * np.float64(v)
        for d, n, v, o in zip(DIMS, data.shape, vs, org)
    }
    all_attrs: dict[str, Any] = dict(attrs or {})
    all_attrs["voxel_size"] = vs
    all_attrs["origin"] = org
    if header is not None:
        all_attrs["header"] = dict(header)
    out = xr.DataArray(data, dims=DIMS, coords=coords, name=name, attrs=all_attrs)
    for d in DIMS:
        out[d].attrs["units"] = "angstrom"
    return out


def voxel_size(vol: xr.DataArray) -> tuple[float, float, float]:
    """Voxel size (vz, vy, vx) in Å of a Volume."""
    try:
        return as_triple(vol.attrs["voxel_size"])
    except KeyError:
        raise GeometryError(f"{vol.name or 'volume'}: no voxel_size attribute; make it with make_volume") from None


def origin(vol: xr.DataArray) -> tuple[float, float, float]:
    """Origin (oz, oy, ox) in Å: the position of the centre of voxel (0, 0, 0)."""
    if "origin" in vol.attrs:
        return as_triple(vol.attrs["origin"])
    return tuple(float(vol[d].values[0]) for d in DIMS)  # type: ignore[return-value]


def is_lazy(vol: xr.DataArray) -> bool:
    """True when the Volume is dask-backed."""
    return isinstance(vol.data, da.Array)


def validate_volume(
    vol: xr.DataArray, *, source: str | None = None, finite: bool = False
) -> xr.DataArray:
    """Check that ``vol`` is a well-formed Volume; return it.

    Parameters
    ----------
    vol
        Candidate Volume.
    source
        File name to put in error messages.
    finite
        If True also check (computing, chunk-wise) that every value is finite.

    Raises
    ------
    GeometryError, ParameterError, DataValueError
    """
    where = f"{source or vol.name or 'volume'}"
    if not isinstance(vol, xr.DataArray):
        raise GeometryError(f"{where}: expected an xarray.DataArray Volume, got {type(vol).__name__}")
    if tuple(vol.dims) != DIMS:
        raise GeometryError(f"{where}: dims must be {DIMS}, got {tuple(vol.dims)}")
    vs = voxel_size(vol)
    _check_voxel_size(vs, where)
    org = origin(vol)
    for d, v, o in zip(DIMS, vs, org):
        c = np.asarray(vol[d].values, dtype=np.float64)
        expect = o + np.arange(c.size) * v
        if not np.allclose(c, expect, rtol=0, atol=1e-6 * max(1.0, abs(v) * c.size)):
            raise GeometryError(f"{where}: coordinate {d} is not origin + index * voxel_size")
    if vol.dtype != np.float32:
        raise GeometryError(f"{where}: data must be float32, got {vol.dtype}")
    if finite:
        bad = int((~da.isfinite(da.asarray(vol.data))).sum().compute())
        if bad:
            raise DataValueError(f"{where}: {bad} voxels are NaN or Inf")
    return vol


def computed_header(header: dict | None) -> dict | None:
    """The header for values computed from a map with ``header``: the same, with float32 for an integer mode.

    See :func:`like`.
    """
    if header and header.get("mode") not in (None, 2):
        return {**header, "mode": 2, "dtype": "float32"}
    return header


def like(template: xr.DataArray, data: Any, *, name: str | None = None, keep_header: bool = True) -> xr.DataArray:
    """A Volume with ``template``'s geometry holding ``data`` (same shape), new values computed from it.

    ``keep_header`` keeps the file conventions of ``template``'s header (axis
    order, labels, origin fields) for writing, but not an integer data mode:
    computed values are written as float32 directly. (Writing tries the
    source's integer mode first only for data read or moved unchanged;
    trying it on computed values would run their whole computation twice,
    once to find a value that does not fit and once more in float32.)
    """
    if tuple(np.shape(data)) != tuple(template.shape):
        raise GeometryError(
            f"data shape {tuple(np.shape(data))} does not match {template.name or 'template'} {tuple(template.shape)}"
        )
    header = computed_header(template.attrs.get("header")) if keep_header else None
    return make_volume(
        data,
        voxel_size=voxel_size(template),
        origin=origin(template),
        name=name if name is not None else template.name,
        header=header,
    )


def check_independent(half1: xr.DataArray, half2: xr.DataArray, *, names: Sequence[str] = ("half1", "half2"),
                      data: bool = False) -> None:
    """Raise :class:`DataValueError` when two half maps were read from the same file.

    Passing one file twice is a classic slip: the FSC is then 1 at every
    frequency and every resolution reads as Nyquist. The files are compared
    (``attrs["header"]["source"]``). With ``data=True`` the arrays are too:
    one array passed twice, the same lazy graph, or in-memory arrays with
    equal values (lazy arrays from different graphs are not computed).
    """
    import os

    src = [((v.attrs.get("header") or {}).get("source")) for v in (half1, half2)]
    if src[0] and src[1] and os.path.realpath(str(src[0])) == os.path.realpath(str(src[1])):
        raise DataValueError(f"{names[0]} and {names[1]} are the same file ({src[0]}): give the two independent "
                             "half maps")
    if not data:
        return
    a, b = half1.data, half2.data
    if isinstance(a, da.Array) or isinstance(b, da.Array):
        same = isinstance(a, da.Array) and isinstance(b, da.Array) and a.name == b.name
    else:
        same = a is b or (np.shape(a) == np.shape(b) and bool(np.array_equal(a, b)))
    if same:
        raise DataValueError(f"{names[0]} and {names[1]} hold the same values: give the two independent half maps "
                             "(their FSC would be 1 at every frequency)")


def check_aligned(*vols: xr.DataArray, names: Sequence[str] | None = None, tol: float = 1e-4) -> None:
    """Raise :class:`GeometryError` unless all Volumes share shape, voxel size and origin.

    ``tol`` is in Å (voxel size and origin are compared to it).
    """
    if len(vols) < 2:
        return
    labels = list(names) if names is not None else [str(v.name or f"volume {i + 1}") for i, v in enumerate(vols)]
    ref = vols[0]
    for lab, v in zip(labels[1:], vols[1:]):
        if tuple(v.shape) != tuple(ref.shape):
            raise GeometryError(f"{lab}: shape {tuple(v.shape)} does not match {labels[0]} {tuple(ref.shape)}")
        if not np.allclose(voxel_size(v), voxel_size(ref), rtol=0, atol=tol):
            raise GeometryError(
                f"{lab}: voxel size {voxel_size(v)} Å does not match {labels[0]} {voxel_size(ref)} Å"
            )
        if not np.allclose(origin(v), origin(ref), rtol=0, atol=tol * 10):
            raise GeometryError(f"{lab}: origin {origin(v)} Å does not match {labels[0]} {origin(ref)} Å")
