"""Fourier shell correlation of two half maps, with RELION's mask correction.

Computes the FSC per shell (shell i = round(|s| L), L = shortest box edge in
Å; RELION's indexing for cubes) and the resolution where it first drops below
0.143 and 0.5 (first-crossing rule, interpolated between shells). With
--mask the masked FSC is corrected by phase randomisation beyond the shell
where the unmasked FSC first drops below --randomize-at-fsc (Chen et al.
2013). Writes OUT.json (summary + curves), OUT.csv (one row per shell) and
OUT.png (unmasked / masked / randomised / corrected curves, 0.143 line,
resolution marked).

Examples
--------
  chunkem fsc half1.mrc half2.mrc
  chunkem fsc half1.mrc half2.mrc --mask mask.mrc -o results/fsc
  chunkem fsc map.mrc modelmap.mrc --mask mask.mrc -o map_model_fsc
"""

from __future__ import annotations

import argparse
import time
import warnings

from .common import add_compute_args, compute_session, warm_matplotlib, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("half1", help="first half map (MRC/CCP4 or .zarr)")
    parser.add_argument("half2", help="second half map (or a model map)")
    parser.add_argument("--mask", help="soft mask in [0, 1] on the same grid")
    parser.add_argument("-o", "--out", default="fsc",
                        help="output prefix: writes PREFIX.json, PREFIX.csv, PREFIX.png (default ./fsc)")
    g = parser.add_argument_group("FSC options")
    g.add_argument("--randomize-at-fsc", type=float, default=0.8,
                   help="randomise phases beyond the first shell where the unmasked FSC < this (default 0.8)")
    g.add_argument("--randomize-at-resolution", type=float, metavar="Å", default=None,
                   help="randomise phases beyond this resolution instead")
    g.add_argument("--seed", type=int, default=0, help="seed of the random phases (default 0; negative = random)")
    g.add_argument("--hermitian-weights", action="store_true",
                   help="count each Friedel pair once (servalcat/gemmi) rather than each rfft voxel (RELION)")
    g.add_argument("--d-min", type=float, metavar="Å", default=None,
                   help="leave out Fourier voxels finer than this resolution (servalcat's -d)")
    g.add_argument("--drop-nyquist-planes", action="store_true", help="leave out the Nyquist planes (emda)")
    g.add_argument("--force-mask", action="store_true",
                   help="keep the corrected curve even when the unmasked one reaches a finer resolution")
    g.add_argument("--molweight", type=float, metavar="kDa", default=None, help="molecular weight for the part-FSC")
    g.add_argument("--voxel-size", type=float, metavar="Å", default=None, help="override the header voxel size")
    g.add_argument("--fft-strategy", choices=["auto", "gather", "slab"], default="auto")
    add_compute_args(parser)


def _fits_in_threads(args: argparse.Namespace, shape: tuple[int, int, int]) -> bool:
    """Whether ``--cluster auto`` should mean the threaded scheduler for this FSC.

    The FSC reads each half map once and reduces it: its working set is about
    both half maps plus both half-space spectra. When that fits in a quarter
    of the available memory, threads in this process beat an embedded
    LocalCluster (no worker start-up, no transfers); beyond, ``auto`` keeps
    its choice (a LocalCluster whose workers can spill to disk).
    """
    if args.scheduler or args.cluster:
        return False
    from .. import config

    if config.get("scheduler", None) or (config.get("cluster", None) or "auto") != "auto":
        return False
    from ..engine.cluster import fits_in_memory

    nz, ny, nx = shape
    need = 2 * nz * ny * nx * 4 + 2 * nz * ny * (nx // 2 + 1) * 8
    return fits_in_memory(need)  # no session yet: this process's available memory


def main(args: argparse.Namespace) -> int:
    from ..io import open_map
    from ..ops.fsc import fsc

    t0 = time.perf_counter()
    h1 = open_map(args.half1, chunks=args.chunks, voxel_size=args.voxel_size)
    chunks = args.chunks
    if _fits_in_threads(args, tuple(int(n) for n in h1.shape)):
        args.cluster = "threads"
        if chunks is None and args.fft_strategy != "slab":
            # in memory on threads: one read per map and no gather (the FFT wants one block anyway)
            chunks = tuple(int(n) for n in h1.shape)
            h1 = open_map(args.half1, chunks=chunks, voxel_size=args.voxel_size)
    h2 = open_map(args.half2, chunks=chunks, voxel_size=args.voxel_size)
    mask = open_map(args.mask, chunks=chunks, voxel_size=args.voxel_size) if args.mask else None
    warm = warm_matplotlib()  # the PNG's imports overlap the FFTs
    with compute_session(args, nbytes_hint=int(h1.size) * 4) as session:
        print(f"chunkem fsc: {args.half1} {tuple(h1.shape)} on {session.describe()}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = fsc(h1, h2, mask=mask, randomize_at_fsc=args.randomize_at_fsc,
                    randomize_at_resolution=args.randomize_at_resolution, seed=args.seed,
                    hermitian_weights=args.hermitian_weights, d_min=args.d_min,
                    drop_nyquist_planes=args.drop_nyquist_planes, force_mask=args.force_mask,
                    molweight_kda=args.molweight, strategy=args.fft_strategy)
        info = session.to_dict()
    for w in caught:
        print(f"warning: {w.message}")
    prefix = args.out
    elapsed = time.perf_counter() - t0
    report = {"verb": "fsc", "half1": args.half1, "half2": args.half2, "mask": args.mask,
              **r.to_dict(), "compute": info, "elapsed_s": round(elapsed, 3)}
    jp = write_json(f"{prefix}.json", report)
    r.to_csv(f"{prefix}.csv")
    warm.join()
    r.plot(f"{prefix}.png")
    c = r.crossing_0143
    print(f"resolution (FSC 0.143): {r.resolution_0143:.3f} Å (shell {c.shell}: {c.resolution:.3f} Å)"
          f"{'' if c.crossed else ' — never crosses, Nyquist'}; FSC 0.5: {r.resolution_05:.3f} Å")
    print(f"wrote {jp}, {prefix}.csv, {prefix}.png in {elapsed:.1f} s")
    return 0
