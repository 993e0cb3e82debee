"""Local resolution map from two half maps (local FSC) or one map (MonoRes).

--method localfsc (default) computes the FSC in a Hann-tapered window
around every voxel (blocres semantics: window --window Å, default 6 × the
global FSC resolution; --cutoff 0.143 or several; padded window shells; first crossing,
interpolated). --mode fast (default) uses band-passed half maps and windowed
sums (cost grows with the number of shells); --mode exact does one windowed
FFT per voxel like blocres (slow; --step N computes every N voxels and
interpolates). --method monores uses the monogenic amplitude against the
noise (half maps: (h1-h2)/2; one map: outside the mask, within the sphere
where a masked map still holds noise; a map flat outside the mask is refused,
one whose noise fades towards the edge gets a warning).

Writes OUT (resolution in Å on the input grid, FILL outside the mask;
.mrc or .zarr), OUT.json (parameters, median and quartiles inside the
mask, fractions at the fine and coarse limits) and OUT.png (histogram and
central slices coloured by resolution).

Examples
--------
  chunkem locres half1.mrc half2.mrc --mask mask.mrc -o locres.mrc
  chunkem locres half1.mrc half2.mrc --mask mask.mrc --cutoff 0.143,0.5 -o locres.mrc   # + locres_fsc0.5.mrc
  chunkem locres half1.mrc half2.mrc --mask mask.mrc --window 25 --mode exact --step 2 -o locres_exact.mrc
  chunkem locres map.mrc --method monores --mask mask.mrc -o monores.mrc
  chunkem locres half1.zarr half2.zarr --mask mask.zarr -o locres.zarr --scheduler tcp://host:8786
"""

from __future__ import annotations

import argparse
import time
import warnings

from .common import add_compute_args, check_output, compute_session, sidecar, write_json


def _cutoff_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one FSC threshold")
    return values


def _cutoff_output(out, cutoff: float):
    """OUT_fsc<C> beside OUT, with OUT's extension (locres.mrc -> locres_fsc0.5.mrc)."""
    ext = out.name[len(sidecar(out, "").name):]
    return sidecar(out, f"_fsc{cutoff:g}{ext}")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("half1", help="first half map, or the map for --method monores (MRC/CCP4 or .zarr)")
    parser.add_argument("half2", nargs="?", default=None, help="second half map (required for localfsc)")
    parser.add_argument("-o", "--out", default="locres.mrc", help="output resolution map (.mrc or .zarr)")
    parser.add_argument("--mask", help="soft mask in [0, 1]: estimate only where mask > 0.5")
    parser.add_argument("--method", choices=["localfsc", "monores"], default="localfsc")
    g = parser.add_argument_group("local FSC")
    g.add_argument("--mode", choices=["fast", "exact"], default="fast")
    g.add_argument("--window", type=float, metavar="Å", default=None,
                   help="window edge in Å (default 6 × the global FSC 0.143 resolution)")
    g.add_argument("--cutoff", type=_cutoff_list, default=[0.143], metavar="C[,C...]",
                   help="FSC threshold(s), comma-separated (default 0.143); with several (blocres' 0.5,0.143) the "
                        "first goes to OUT, each other one to OUT_fsc<C> beside it (all from one pass)")
    g.add_argument("--step", type=int, default=None, help="--mode exact: compute every STEP voxels, interpolate")
    g.add_argument("--pad", type=int, default=1, help="window padding factor (FFT size window × (pad+1))")
    g.add_argument("--band-spacing", type=float, metavar="1/Å", default=None,
                   help="--mode fast: spacing of the band centres (default 1/window)")
    g.add_argument("--faces", choices=["auto", "mirror", "periodic"], default="auto",
                   help="beyond the map's faces: mirrored, or wrapped around (periodic); auto (default) mirrors the "
                        "axes whose faces carry density (half maps correlating above 0.05 there)")
    m = parser.add_argument_group("MonoRes")
    m.add_argument("--max-resolution", type=float, metavar="Å", default=None, help="coarsest resolution tested")
    m.add_argument("--resolution-step", type=float, metavar="Å", default=0.25)
    m.add_argument("--significance", type=float, default=0.95, help="noise quantile (default 0.95)")
    m.add_argument("--monores-filter", choices=["band", "highpass"], default="band")
    m.add_argument("--smoothing", type=float, default=2.0, help="amplitude low-passed at f/SMOOTHING (Xmipp: 1)")
    parser.add_argument("--best", type=float, metavar="Å", default=None,
                        help="finest reported resolution (default Nyquist)")
    parser.add_argument("--worst", type=float, metavar="Å", default=None, help="coarsest reported resolution")
    parser.add_argument("--fill", type=float, default=0.0, help="value outside the mask (default 0)")
    parser.add_argument("--voxel-size", type=float, metavar="Å", default=None, help="override the header voxel size")
    parser.add_argument("--fft-strategy", choices=["auto", "gather", "slab"], default="auto")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    from ..io import open_map, save
    from ..ops.locres import local_resolution

    out = check_output(args.out, args.half1, args.half2, args.mask)
    t0 = time.perf_counter()
    h1 = open_map(args.half1, chunks=args.chunks, voxel_size=args.voxel_size)
    h2 = open_map(args.half2, chunks=args.chunks, voxel_size=args.voxel_size) if args.half2 else None
    mask = open_map(args.mask, chunks=args.chunks, voxel_size=args.voxel_size) if args.mask else None
    with compute_session(args, nbytes_hint=int(h1.size) * 4) as session:
        print(f"chunkem locres: {args.half1} {tuple(h1.shape)} ({args.method}) on {session.describe()}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = local_resolution(
                h1, h2, method=args.method, mode=args.mode, window=args.window, mask=mask, cutoff=args.cutoff,
                step=args.step, best=args.best, worst=args.worst, pad=args.pad, band_spacing=args.band_spacing,
                faces=args.faces,
                max_resolution=args.max_resolution, resolution_step=args.resolution_step,
                significance=args.significance, monores_filter=args.monores_filter, smoothing=args.smoothing,
                fill=args.fill, strategy=args.fft_strategy,
            )
            outputs = {r.cutoff: out, **{c: _cutoff_output(out, c) for c in r.extra}}  # MonoRes: {None: out}
            if r.extra:  # every cutoff's map from one pass through the bands
                from .locspiral import save_all

                save_all({c: r.at_cutoff(c).resolution for c in outputs}, outputs, progress=not args.no_progress)
            else:
                save(r.resolution, out, progress=not args.no_progress)
            # statistics and plots from the written maps (no second computation)
            done = {c: r.at_cutoff(c).with_resolution(open_map(p, chunks=args.chunks)) for c, p in outputs.items()}
            first = next(iter(done))
            report = {"verb": "locres", "half1": args.half1, "half2": args.half2, "mask": args.mask,
                      "output": str(out), **done[first].to_dict(), "compute": session.to_dict()}
            if r.extra:
                report["cutoffs"] = r.cutoffs
                report["other_cutoffs"] = {f"{c:g}": {"output": str(outputs[c]), "statistics": done[c].statistics()}
                                           for c in r.extra}
            png = done[first].plot(sidecar(out, ".png"))
            for c in r.extra:
                done[c].plot(sidecar(outputs[c], ".png"), title=f"local resolution (FSC {c:g})")
    for w in caught:
        print(f"warning: {w.message}")
    elapsed = time.perf_counter() - t0
    report["elapsed_s"] = round(elapsed, 3)
    report["warnings"] = [str(w.message) for w in caught]
    jp = write_json(sidecar(out, ".json"), report)
    st = report["statistics"]
    if st.get("n_voxels"):
        print(f"local resolution in mask: median {st['median_A']:.2f} Å, quartiles {st['q25_A']:.2f}-"
              f"{st['q75_A']:.2f} Å ({st['n_voxels']} voxels)"
              + (f"; window {r.window:.1f} Å" if r.window else ""))
        fine, coarse = r.limits
        for key, what, why in [("at_best_fraction", f"fine limit {fine:.2f} Å", "the voxel size (Nyquist) or "
                                "--best, not the data, limits them"),
                               ("at_worst_fraction", f"coarse limit {coarse:.2f} Å", "the window or --worst / "
                                "--max-resolution, not the data, limits them")]:
            if st.get(key, 0.0) >= 0.25:
                print(f"note: {100 * st[key]:.0f} % of the mask voxels are at the {what}: {why}")
    for c in r.extra:
        st_c = report["other_cutoffs"][f"{c:g}"]["statistics"]
        if st_c.get("n_voxels"):
            print(f"FSC {c:g}: median {st_c['median_A']:.2f} Å, quartiles {st_c['q25_A']:.2f}-{st_c['q75_A']:.2f} Å "
                  f"-> {outputs[c]}")
    print(f"wrote {out}, {jp}, {png} in {elapsed:.1f} s")
    return 0
