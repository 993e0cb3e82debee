"""Atom binning into output tiles, reach, and one-task-per-tile dask arrays."""

from __future__ import annotations

import dask
import gemmi
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.engine.atoms import PackedAtoms, bin_atoms, grid_like, map_tiles, reach
from chunkem.errors import GeometryError, ParameterError
from chunkem.kernels.render import AtomSet, Imaging, atom_radii, render_block
from chunkem.kernels.scattering import form_factors

from .strategies import partitions


def _brute_members(xyz, r, shape, chunks, vs, org):
    """Tiles holding at least one voxel strictly within reach of each atom (exhaustive)."""
    starts = [np.cumsum((0,) + c[:-1]) for c in chunks]
    need = {}
    grids = [org[ax] + np.arange(shape[ax]) * vs[ax] for ax in range(3)]
    for a, (p, ra) in enumerate(zip(xyz[:, ::-1], r)):
        d2 = [(g - p[ax]) ** 2 for ax, g in enumerate(grids)]
        close = (d2[0][:, None, None] + d2[1][None, :, None] + d2[2][None, None, :]) < ra * ra
        for iz, (z0, cz) in enumerate(zip(starts[0], chunks[0])):
            for iy, (y0, cy) in enumerate(zip(starts[1], chunks[1])):
                for ix, (x0, cx) in enumerate(zip(starts[2], chunks[2])):
                    if close[z0:z0 + cz, y0:y0 + cy, x0:x0 + cx].any():
                        need.setdefault((iz, iy, ix), set()).add(a)
    return need


@settings(max_examples=12, deadline=None)
@given(
    shape=st.tuples(*(st.integers(5, 24) for _ in range(3))),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_bin_atoms_covers_every_tile_an_atom_reaches(shape, data, seed):
    chunks = tuple(data.draw(partitions(n)) for n in shape)
    rng = np.random.default_rng(seed)
    vs = tuple(rng.uniform(0.6, 1.6, 3))
    org = tuple(rng.uniform(-20, 20, 3))
    n = 25
    ext = np.asarray(shape) * np.asarray(vs)
    zyx = np.asarray(org) + rng.uniform(-0.2, 1.2, (n, 3)) * ext  # some atoms outside the box
    xyz = zyx[:, ::-1]
    r = rng.uniform(0.5, 4.0, n)
    tiles = bin_atoms(xyz, r, shape=shape, chunks=chunks, voxel_size=vs, origin=org)
    need = _brute_members(xyz, r, shape, chunks, vs, org)
    for key, atoms in need.items():
        assert atoms <= set(tiles.atoms_in(key).tolist()), key
    # and no atom is listed far from a tile: its reach box (+1 voxel) must overlap the tile
    starts = tiles.starts
    for key, ids in tiles.members.items():
        for a in ids:
            p = zyx[a]
            for ax in range(3):
                lo = org[ax] + starts[ax][key[ax]] * vs[ax]
                hi = lo + (chunks[ax][key[ax]] - 1) * vs[ax]
                assert p[ax] + r[a] + vs[ax] >= lo and p[ax] - r[a] - vs[ax] <= hi


def test_reach_equals_gemmi_radius_and_finite_reach():
    dc = gemmi.DensityCalculatorE()
    a = gemmi.Atom()
    a.occ = 1.0
    a.element = gemmi.Element("C")
    for b, blur in ((0.0, 0.0), (20.0, 10.0), (150.0, 0.0)):
        a.b_iso = b + blur
        assert reach(b, blur=blur)[0] == pytest.approx(dc.estimate_radius(a), abs=2e-3)
    assert reach([10.0, 90.0], resolution=3.0, radius_factor=2.5).tolist() == [7.5, 7.5]
    with pytest.raises(ParameterError):
        reach(10.0, resolution=3.0)


def test_bin_atoms_rejects_bad_input():
    with pytest.raises(GeometryError):
        bin_atoms(np.zeros((1, 3)), 1.0, shape=(0, 4, 4), chunks=2, voxel_size=1.0)
    with pytest.raises(ParameterError):
        bin_atoms(np.zeros((1, 3)), -1.0, shape=(4, 4, 4), chunks=2, voxel_size=1.0)


def _tile_render(payload, *, shape, offset, voxel_size, imaging):
    atoms, rad = payload
    return render_block(shape, offset=offset, voxel_size=voxel_size, atoms=atoms, imaging=imaging, radius=rad)


@settings(max_examples=10, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), finite=st.booleans())
def test_map_tiles_equals_single_block_render(data, seed, finite):
    """Any tiling (uneven chunks, tile edges through atoms, atoms at/over the box edge) = one block."""
    shape = (37, 29, 33)
    chunks = tuple(data.draw(partitions(n, 5)) for n in shape)
    rng = np.random.default_rng(seed)
    vs = (0.9, 1.1, 1.0)
    org = (-3.0, 2.5, 10.0)
    n = 40
    zyx = np.asarray(org) + rng.uniform(-0.05, 1.05, (n, 3)) * np.asarray(shape) * np.asarray(vs)
    atoms = AtomSet(zyx[:, ::-1], rng.uniform(5, 80, n), rng.uniform(0.3, 1, n),
                    form_factors(rng.choice(["C", "N", "O", "S"], n)))
    imaging = Imaging("finite", resolution=3.0) if finite else Imaging(blur=8.0)
    rad = atom_radii(atoms, imaging)
    tiles = bin_atoms(atoms.xyz, rad, shape=shape, chunks=chunks, voxel_size=vs, origin=org)
    arr = map_tiles(_tile_render, tiles, take=lambda ids: (atoms.take(ids), rad[ids]), imaging=imaging)
    assert arr.chunks == tiles.chunks
    whole = render_block(shape, offset=org, voxel_size=vs, atoms=atoms, imaging=imaging, radius=rad)
    got = arr.compute(scheduler="threads")
    np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6 * float(np.abs(whole).max()))


def test_map_tiles_one_task_per_tile_and_lazy():
    rng = np.random.default_rng(0)
    atoms = AtomSet(rng.uniform(2, 10, (10, 3)), 20.0, 1.0, form_factors(["C"] * 10))
    imaging = Imaging()
    rad = atom_radii(atoms, imaging)
    tiles = bin_atoms(atoms.xyz, rad, shape=(40, 40, 40), chunks=10, voxel_size=1.0)
    calls = []

    def f(payload, **kw):
        calls.append(1)
        return _tile_render(payload, **kw)

    arr = map_tiles(f, tiles, take=lambda ids: (atoms.take(ids), rad[ids]), imaging=imaging)
    assert not calls  # lazy: nothing rendered yet
    with dask.config.set(scheduler="sync"):
        arr.compute()
    assert len(calls) == len(tiles.members) < 64  # only tiles the atoms reach run the kernel


def _random_atoms(n, seed, aniso=False):
    rng = np.random.default_rng(seed)
    u = None
    if aniso:
        u = np.zeros((n, 6))
        u[::2, :3] = rng.uniform(0.1, 0.4, (len(u[::2]), 3))
    return AtomSet(rng.uniform(0, 30, (n, 3)), rng.uniform(5, 80, n), rng.uniform(0.3, 1, n),
                   form_factors(rng.choice(["C", "N", "O", "S", "H"], n)), u)


@pytest.mark.parametrize("aniso", [False, True])
def test_packed_atoms_select_equals_take(aniso):
    atoms = _random_atoms(50, 3, aniso)
    rad = atom_radii(atoms, Imaging(blur=5.0))
    packed = PackedAtoms(atoms, rad)
    ids = np.array([3, 7, 7, 20, 49])
    got, r = packed.select(ids)
    ref = atoms.take(ids)
    for name in ("xyz", "b_iso", "occ"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
    np.testing.assert_array_equal(got.ff.a, ref.ff.a)
    np.testing.assert_array_equal(got.ff.b, ref.ff.b)
    np.testing.assert_array_equal(r, rad[ids])
    assert (got.aniso_u is None) == (ref.aniso_u is None)
    if aniso:
        np.testing.assert_array_equal(got.aniso_u, ref.aniso_u)
    full = (atoms.xyz, atoms.b_iso, atoms.occ, atoms.ff.a, atoms.ff.b, rad, atoms.aniso_u)
    assert packed.nbytes < 0.6 * sum(a.nbytes for a in full if a is not None)


def test_map_tiles_shared_table_equals_embedded_payloads_and_keeps_the_graph_small():
    """The atom table is in the graph once: the graph grows with tiles, not with atoms x tiles."""
    import cloudpickle

    atoms = _random_atoms(3000, 5)
    imaging = Imaging(blur=5.0)
    rad = atom_radii(atoms, imaging)
    shape, vs = (30, 31, 29), (1.0, 1.0, 1.05)
    tiles = bin_atoms(atoms.xyz, rad, shape=shape, chunks=(7, 9, 8), voxel_size=vs)
    old = map_tiles(_tile_render, tiles, take=lambda ids: (atoms.take(ids), rad[ids]), imaging=imaging)
    new = map_tiles(_tile_render, tiles, table=PackedAtoms(atoms, rad), imaging=imaging, token=("t", 1))
    with dask.config.set(scheduler="sync"):
        np.testing.assert_array_equal(new.compute(), old.compute())
    size_old = len(cloudpickle.dumps(dict(old.__dask_graph__())))
    size_new = len(cloudpickle.dumps(dict(new.__dask_graph__())))
    assert tiles.n_assigned > 5 * len(atoms)  # every atom is in several tiles
    assert size_new < size_old / 8
    assert size_new < PackedAtoms(atoms, rad).nbytes + 8 * tiles.n_assigned + 300_000
    with pytest.raises(ParameterError):
        map_tiles(_tile_render, tiles, imaging=imaging)


@pytest.mark.distributed
def test_map_tiles_scatters_a_large_table_to_the_workers(two_worker_client, monkeypatch):
    import chunkem.engine.atoms as eat

    monkeypatch.setattr(eat, "_SCATTER_BYTES", 0)
    atoms = _random_atoms(200, 6)
    imaging = Imaging(blur=5.0)
    rad = atom_radii(atoms, imaging)
    tiles = bin_atoms(atoms.xyz, rad, shape=(20, 22, 24), chunks=(7, 9, 8), voxel_size=1.3)
    arr = map_tiles(_tile_render, tiles, table=PackedAtoms(atoms, rad), imaging=imaging)
    graph = dict(arr.__dask_graph__())
    assert not any(isinstance(v, PackedAtoms) for v in graph.values())  # the table went to the workers
    whole = render_block((20, 22, 24), offset=(0, 0, 0), voxel_size=1.3, atoms=atoms, imaging=imaging, radius=rad)
    got = two_worker_client.compute(arr).result()
    np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6 * float(np.abs(whole).max()))


def test_grid_like_takes_geometry_chunks_and_header():
    from chunkem.volume import make_volume

    vol = make_volume(np.zeros((10, 12, 14), np.float32), voxel_size=(1.0, 1.1, 1.2), origin=(3.0, -2.0, 5.0))
    g = grid_like(vol)
    assert g.shape == (10, 12, 14) and g.voxel_size == (1.0, 1.1, 1.2) and g.origin == (3.0, -2.0, 5.0)
    assert not g.lazy and sum(g.chunks[0]) == 10
    lazy = grid_like(vol.chunk({"z": 4, "y": 5, "x": 6}))
    assert lazy.lazy and lazy.chunks == ((4, 4, 2), (5, 5, 2), (6, 6, 2))
    assert grid_like(vol.chunk(4), chunks=(5, 6, 7)).chunks == ((5, 5), (6, 6), (7, 7))
