"""Atoms into output tiles: spatial binning by reach, and one dask task per tile.

Rendering a model map (or any per-atom quantity on a grid) is local: an atom
touches only the voxels within its *reach* (Å). :func:`bin_atoms` assigns
each atom to every output tile (chunk) whose box comes within the atom's
reach, so each tile can render **only its own voxels** from its own atom
list: tiles never share writes, no overlap-add, and no tile ever holds the
whole map. :func:`map_tiles` turns a per-tile numpy function into a dask
array with exactly one task per tile. The atom table goes into the graph
once (:class:`PackedAtoms`: compact, form factors stored per element; with
a distributed client a large table is scattered to the workers instead) and
each tile task picks its own atoms from it, so the graph holds only the
tiles' atom indices — not a copy of every tile's atoms.

How far an atom reaches (spec 06 §6), :func:`reach`:

* Gaussian (unlimited-resolution) image, the recommended route: the radius
  where the atom's density (occupancy 1) falls below ``cutoff`` at
  ``B + blur`` — for carbon (electron table) at cutoff 1e-5: B' = 0 → 3.41 Å,
  20 → 3.87, 50 → 4.48, 100 → 5.38, 200 → 6.78 Å (gemmi's
  ``estimate_radius`` gives the same; spec 06's table quotes ~0.1 Å less);
* finite-resolution image truncated at ``k·d`` (default k = 2.5): ``k·d``.

B convention: atomic ADP ("decay") B in Å².
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
from dask.delayed import Delayed
import numpy as np

from ..errors import GeometryError, ParameterError
from ..volume import as_triple, computed_header, validate_volume
from ..volume import origin as vol_origin
from ..volume import voxel_size as vol_voxel_size
from .chunks import auto_chunks

__all__ = ["AtomTiles", "bin_atoms", "reach", "map_tiles", "normalize_chunks", "PackedAtoms", "TileGrid", "grid_like"]

_SCATTER_BYTES = 4 << 20  # shared tables larger than this are scattered when a distributed client is active


def reach(
    b_iso: float | np.ndarray,
    *,
    blur: float = 0.0,
    cutoff: float = 1e-5,
    element: str | Sequence[str] = "C",
    resolution: float | None = None,
    radius_factor: float | None = None,
    table: str = "electron",
) -> np.ndarray:
    """Reach (Å) of atoms: how far their image extends.

    Parameters
    ----------
    b_iso
        Atomic B (Å², decay convention), scalar or per atom.
    blur
        Extra B (Å²) added for rendering (Gaussian image).
    cutoff
        Density level defining the edge of a Gaussian image (gemmi: 1e-5).
    element
        Element symbol(s) (default carbon).
    resolution, radius_factor
        For a finite-resolution image truncated at ``radius_factor ·
        resolution`` Å, give both: the reach is that radius, whatever B.
    table
        Scattering table (``"electron"`` or ``"xray"``).

    Returns
    -------
    ndarray
        Reach in Å, one per atom (shape of ``b_iso`` broadcast with ``element``).

    Examples
    --------
    >>> [round(float(r), 2) for r in reach([0.0, 20.0, 50.0, 100.0, 200.0])]  # = gemmi estimate_radius
    [3.41, 3.87, 4.48, 5.38, 6.78]
    """
    from ..kernels.scattering import cutoff_radius, form_factors

    b = np.atleast_1d(np.asarray(b_iso, dtype=np.float64))
    els = np.atleast_1d(np.asarray(element).astype(str))
    b, els = np.broadcast_arrays(b, els)
    if resolution is not None or radius_factor is not None:
        if resolution is None or radius_factor is None:
            raise ParameterError("reach of a finite-resolution image needs both resolution and radius_factor")
        return np.full(b.shape, float(radius_factor) * float(resolution))
    ff = form_factors(els.ravel(), table=table)
    return cutoff_radius(ff.a, ff.b, b.ravel() + float(blur), cutoff=cutoff).reshape(b.shape)


def normalize_chunks(chunks: Any, shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Dask-style chunks (an edge, a (z, y, x) triple or explicit tuples) as explicit tuples."""
    return da.core.normalize_chunks(chunks, tuple(int(n) for n in shape), dtype=np.float32)


@dataclass(frozen=True)
class TileGrid:
    """An output grid for tiled rendering (z, y, x; voxels, Å, Å).

    Attributes
    ----------
    shape, voxel_size, origin : tuple
        Grid geometry; ``origin`` is the position of voxel (0, 0, 0).
    chunks : tuple of tuples
        Output tiles (explicit dask chunks).
    lazy : bool
        Whether the result should stay a dask array (else it is computed).
    header : Any
        Header of the template map (``like.attrs["header"]``), or None.
    """

    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    chunks: tuple[tuple[int, ...], ...]
    lazy: bool = True
    header: Any = None


def grid_like(like: Any, chunks: Any = None) -> TileGrid:
    """The grid of a Volume ``like``: its shape, voxel size, origin and tiles.

    Tiles are ``chunks`` if given, else ``like``'s dask chunks, else automatic;
    the result is lazy when ``like`` is dask-backed.
    """
    validate_volume(like)
    shape = tuple(int(n) for n in like.shape)
    lazy = isinstance(like.data, da.Array)
    out_chunks = chunks if chunks is not None else (like.data.chunks if lazy else auto_chunks(shape))
    return TileGrid(shape, vol_voxel_size(like), vol_origin(like), normalize_chunks(out_chunks, shape),  # type: ignore[arg-type]
                    lazy, computed_header(like.attrs.get("header")))  # rendered values: float32


class PackedAtoms:
    """An :class:`~chunkem.kernels.render.AtomSet` and radii in a compact form for a task graph.

    Form-factor coefficients are stored once per distinct row (element) with
    a per-atom index, anisotropic U only when present: about 45 bytes per
    atom instead of ~130. :meth:`select` rebuilds the AtomSet of some atoms
    (inside a tile task).

    Parameters
    ----------
    atoms
        The atoms.
    radius
        Per-atom radius / reach (Å).
    """

    def __init__(self, atoms: Any, radius: np.ndarray):
        self.xyz = np.ascontiguousarray(atoms.xyz, dtype=np.float64)
        self.b_iso = np.ascontiguousarray(atoms.b_iso, dtype=np.float64)
        self.occ = np.ascontiguousarray(atoms.occ, dtype=np.float64)
        T = atoms.ff.a.shape[1]
        rows, idx = np.unique(np.concatenate([atoms.ff.a, atoms.ff.b], axis=1), axis=0, return_inverse=True)
        self.ff_a, self.ff_b = rows[:, :T].copy(), rows[:, T:].copy()
        self.ff_index = idx.ravel().astype(np.int32 if rows.shape[0] > 255 else np.uint8)
        self.table = atoms.ff.table
        self.aniso_u = None if atoms.aniso_u is None else np.ascontiguousarray(atoms.aniso_u, dtype=np.float64)
        self.radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (self.xyz.shape[0],)).copy()

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def nbytes(self) -> int:
        arrays = (self.xyz, self.b_iso, self.occ, self.ff_a, self.ff_b, self.ff_index, self.radius, self.aniso_u)
        return int(sum(a.nbytes for a in arrays if a is not None))

    def select(self, ids: np.ndarray) -> tuple[Any, np.ndarray]:
        """``(AtomSet, radius)`` of atoms ``ids``."""
        from ..kernels.render import AtomSet
        from ..kernels.scattering import FormFactors

        k = self.ff_index[ids]
        ff = FormFactors(self.ff_a[k], self.ff_b[k], self.table)
        aniso = None if self.aniso_u is None else self.aniso_u[ids]
        return AtomSet(self.xyz[ids], self.b_iso[ids], self.occ[ids], ff, aniso), self.radius[ids]


@dataclass
class AtomTiles:
    """Atoms binned into the tiles (chunks) of an output grid.

    Attributes
    ----------
    shape : tuple
        Grid shape (nz, ny, nx).
    chunks : tuple of tuples
        Tile sizes per axis (dask chunks).
    voxel_size, origin : tuple
        Grid geometry (z, y, x), Å.
    members : dict
        Tile index (iz, iy, ix) → sorted int array of the atoms reaching it.
        Tiles no atom reaches are absent.
    """

    shape: tuple[int, int, int]
    chunks: tuple[tuple[int, ...], ...]
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    members: dict[tuple[int, int, int], np.ndarray]

    @property
    def starts(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(s) for s in np.cumsum((0,) + tuple(c[:-1]))) for c in self.chunks)

    @property
    def numblocks(self) -> tuple[int, int, int]:
        return tuple(len(c) for c in self.chunks)  # type: ignore[return-value]

    def tile_shape(self, idx: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(self.chunks[ax][idx[ax]] for ax in range(3))  # type: ignore[return-value]

    def tile_slices(self, idx: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        st = self.starts
        return tuple(slice(st[ax][idx[ax]], st[ax][idx[ax]] + self.chunks[ax][idx[ax]]) for ax in range(3))  # type: ignore[return-value]

    def tile_offset(self, idx: tuple[int, int, int]) -> tuple[float, float, float]:
        """Position (z, y, x, Å) of the tile's first voxel."""
        st = self.starts
        return tuple(self.origin[ax] + st[ax][idx[ax]] * self.voxel_size[ax] for ax in range(3))  # type: ignore[return-value]

    def tiles(self) -> Iterator[tuple[int, int, int]]:
        """All tile indices in C order."""
        return iter(np.ndindex(*self.numblocks))  # type: ignore[arg-type]

    def atoms_in(self, idx: tuple[int, int, int]) -> np.ndarray:
        return self.members.get(tuple(int(i) for i in idx), np.zeros(0, dtype=np.int64))  # type: ignore[arg-type]

    @property
    def n_assigned(self) -> int:
        """Total atom-tile assignments (≥ number of atoms inside; atoms near edges count several times)."""
        return int(sum(v.size for v in self.members.values()))

    def to_dict(self) -> dict[str, Any]:
        counts = [v.size for v in self.members.values()]
        return {
            "tiles": int(np.prod(self.numblocks)),
            "tiles_with_atoms": len(self.members),
            "assignments": self.n_assigned,
            "max_atoms_per_tile": int(max(counts)) if counts else 0,
        }


def bin_atoms(
    xyz: np.ndarray,
    reach: float | np.ndarray,
    *,
    shape: Sequence[int],
    chunks: Any,
    voxel_size: float | Sequence[float],
    origin: float | Sequence[float] = 0.0,
) -> AtomTiles:
    """Assign atoms to every tile whose voxels lie within their reach.

    An atom at ``p`` with reach ``r`` is listed in a tile when the tile's
    voxel index range intersects ``[floor((p - r - origin)/h), ceil((p + r
    - origin)/h)]`` on every axis (slightly generous; the renderer keeps
    only voxels with ``|x - p| < r``). Atoms that reach no voxel are in no
    tile.

    Parameters
    ----------
    xyz
        (n, 3) positions, x, y, z in Å.
    reach
        Reach in Å, scalar or (n,).
    shape
        Grid shape (nz, ny, nx).
    chunks
        Tiles: an edge length, a (z, y, x) triple or explicit dask chunks.
    voxel_size, origin
        Grid geometry, Å (z, y, x order; ``origin`` is voxel (0, 0, 0)).

    Returns
    -------
    AtomTiles

    Examples
    --------
    >>> t = bin_atoms(np.array([[10.0, 1.0, 1.0]]), 2.0, shape=(4, 4, 16), chunks=(4, 4, 8), voxel_size=1.0)
    >>> sorted(t.members)          # x = 10 ± 2 Å lies in the second x tile only
    [(0, 0, 1)]
    """
    shp = tuple(int(n) for n in shape)
    if len(shp) != 3 or any(n <= 0 for n in shp):
        raise GeometryError(f"grid shape must be 3 positive numbers, got {tuple(shape)}")
    vs = np.asarray(as_triple(voxel_size, "voxel_size"))
    org = np.asarray(as_triple(origin, "origin"))
    ch = normalize_chunks(chunks, shp)
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    n = xyz.shape[0]
    r = np.broadcast_to(np.asarray(reach, dtype=np.float64), (n,))
    if np.any(~np.isfinite(r)) or np.any(r < 0):
        raise ParameterError("atom reach must be finite and ≥ 0 Å")
    zyx = xyz[:, ::-1]
    lo = np.floor((zyx - r[:, None] - org) / vs).astype(np.int64)
    hi = np.ceil((zyx + r[:, None] - org) / vs).astype(np.int64)
    n_ax = np.asarray(shp)
    inside = np.all((hi >= 0) & (lo <= n_ax - 1), axis=1) & np.all(np.isfinite(zyx), axis=1)
    members: dict[tuple[int, int, int], np.ndarray] = {}
    if not inside.any():
        return AtomTiles(shp, ch, tuple(vs), tuple(org), members)  # type: ignore[arg-type]
    ids = np.nonzero(inside)[0]
    lo = np.clip(lo[ids], 0, n_ax - 1)
    hi = np.clip(hi[ids], 0, n_ax - 1)
    bounds = [np.cumsum((0,) + tuple(c)) for c in ch]
    nb = np.asarray([len(c) for c in ch], dtype=np.int64)
    blo = np.stack([np.searchsorted(bounds[ax], lo[:, ax], side="right") - 1 for ax in range(3)], axis=1)
    bhi = np.stack([np.searchsorted(bounds[ax], hi[:, ax], side="right") - 1 for ax in range(3)], axis=1)
    cnt = bhi - blo + 1  # (m, 3)
    tot = np.prod(cnt, axis=1)
    atom = np.repeat(ids, tot)
    first = np.repeat(np.cumsum(tot) - tot, tot)
    k = np.arange(int(tot.sum())) - first
    c = np.repeat(cnt, tot, axis=0)
    b0 = np.repeat(blo, tot, axis=0)
    kx = k % c[:, 2]
    ky = (k // c[:, 2]) % c[:, 1]
    kz = k // (c[:, 2] * c[:, 1])
    lin = ((b0[:, 0] + kz) * nb[1] + (b0[:, 1] + ky)) * nb[2] + (b0[:, 2] + kx)
    order = np.lexsort((atom, lin))
    lin, atom = lin[order], atom[order]
    keys, starts = np.unique(lin, return_index=True)
    for key, part in zip(keys, np.split(atom, starts[1:])):
        iz, rem = divmod(int(key), int(nb[1] * nb[2]))
        iy, ix = divmod(rem, int(nb[2]))
        members[(iz, iy, ix)] = part
    return AtomTiles(shp, ch, tuple(vs), tuple(org), members)  # type: ignore[arg-type]


def _shared_in_graph(table: Any, name: str, token: Any) -> Any:
    """``table`` as one graph node (a scattered future for a large table under a distributed client)."""
    if isinstance(table, Delayed):
        return table
    nbytes = getattr(table, "nbytes", 0)
    if nbytes > _SCATTER_BYTES:
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):
            client = None
        if client is not None:
            return client.scatter(table, hash=True)
    key = f"{name}-table-{dask.base.tokenize(token) if token is not None else dask.base.tokenize(table)}"
    return dask.delayed(table, name=key, pure=True, traverse=False)


def _select_method(table: Any, ids: np.ndarray) -> Any:
    return table.select(ids)


def _run_tile(table: Any, ids: np.ndarray, *, func: Callable[..., np.ndarray], select: Callable[[Any, np.ndarray], Any],
              **kwargs: Any) -> np.ndarray:
    return func(select(table, ids), **kwargs)


def map_tiles(
    func: Callable[..., np.ndarray],
    tiles: AtomTiles,
    *,
    take: Callable[[np.ndarray], Any] | None = None,
    table: Any = None,
    select: Callable[[Any, np.ndarray], Any] | None = None,
    dtype: Any = np.float32,
    name: str = "atoms-tile",
    token: Any = None,
    **kwargs: Any,
) -> da.Array:
    """A dask array with one task per tile: ``func(payload, shape=, offset=, voxel_size=, **kwargs)``.

    The per-tile payload comes either from ``take(ids)`` at graph
    construction (embedded in each task: fine for small payloads), or, with
    ``table``, from ``select(table, ids)`` inside the task: the table is one
    node of the graph (scattered to the workers when it is large and a
    distributed client is active) and each task holds only its atom indices.

    Parameters
    ----------
    func
        ``func(payload, *, shape, offset, voxel_size, **kwargs) -> ndarray`` of
        ``shape``; ``offset`` is the tile's first voxel (z, y, x, Å).
    tiles
        From :func:`bin_atoms`.
    take
        ``take(indices)`` → the per-tile payload, embedded in the tile's task.
    table, select
        A shared table (e.g. :class:`PackedAtoms`, or a ``dask.delayed``
        object) and ``select(table, indices)`` → the payload (default
        ``table.select(indices)``). Give either ``take`` or ``table``.
    dtype
        Output dtype.
    name, token
        Task key prefix, and a token identifying the whole input (model and
        parameters) so keys are deterministic without hashing each payload.
    kwargs
        Passed to ``func`` (keep them small: they go into every task).

    Returns
    -------
    dask.array.Array
        Shape ``tiles.shape``, chunks ``tiles.chunks``; tiles no atom
        reaches are zeros (no task runs a kernel for them).
    """
    if (take is None) == (table is None):
        raise ParameterError("map_tiles: give either take= or table=")
    shared = None if table is None else _shared_in_graph(table, name, token)
    pick = select if select is not None else _select_method
    nbz, nby, nbx = tiles.numblocks
    rows = []
    for iz in range(nbz):
        plane = []
        for iy in range(nby):
            line = []
            for ix in range(nbx):
                idx = (iz, iy, ix)
                shp = tiles.tile_shape(idx)
                ids = tiles.members.get(idx)
                if ids is None or ids.size == 0:
                    line.append(da.zeros(shp, dtype=dtype, chunks=shp))
                    continue
                geom = dict(shape=shp, offset=tiles.tile_offset(idx), voxel_size=tiles.voxel_size)
                if shared is None:
                    payload = take(ids)  # type: ignore[misc]
                    key = f"{name}-{dask.base.tokenize(token if token is not None else payload, ids, idx, kwargs)}"
                    task = dask.delayed(func, pure=True)(payload, dask_key_name=key, **geom, **kwargs)
                else:
                    small = ids.astype(np.int32) if len(ids) and int(ids.max()) < 2**31 else ids
                    key = f"{name}-{dask.base.tokenize(token if token is not None else shared, ids, idx, kwargs)}"
                    task = dask.delayed(_run_tile, pure=True)(shared, small, func=func, select=pick,
                                                              dask_key_name=key, **geom, **kwargs)
                line.append(da.from_delayed(task, shape=shp, dtype=dtype, meta=np.empty((0, 0, 0), dtype=dtype)))
            plane.append(line)
        rows.append(plane)
    return da.block(rows)
