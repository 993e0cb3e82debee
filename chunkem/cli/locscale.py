"""Local amplitude scaling (LocScale): sharpen a map window by window against a reference.

The reference is a model map (--model-map), an atomic model rendered on the
map's grid (--model; ADPs refined against the map unless --no-refine, B
shifted so that the 1st percentile is 0), or, with --model-free, the expected
scattering of protein with a locally fitted B brought to --target-bfactor.
Voxels in --mask (default: the FDR mask at 1 %) are scaled in a cubic window
of --window Å (rounded up to an even number of voxels). Modes: fast (default;
band-pass maps and windowed band energies), exact (the per-window math,
batched) and locscale2 (exact with LocScale 2's radial bins: reproduces
locscale 2.3). Writes OUT, OUT.json and OUT.png (central slices and radial
profiles of the input and output).

Examples
--------
  chunkem locscale map.mrc scaled.mrc --model-map modelmap.mrc --mask mask.mrc --resolution 3.2
  chunkem locscale map.mrc scaled.mrc --model model.cif --resolution 3.2 --mode exact
  chunkem locscale map.mrc scaled.mrc --model-free --resolution 3.5 --target-bfactor 20
"""

from __future__ import annotations

import argparse
import io
import time
import warnings
from pathlib import Path

import numpy as np

from .common import add_compute_args, atomic_write_bytes, check_output, compute_session, sidecar, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", help="unsharpened, unfiltered map (MRC/CCP4 or .zarr)")
    parser.add_argument("output", help="output map (.mrc or .zarr)")
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--model", metavar="MODEL", help="atomic model (PDB/mmCIF) for the reference map")
    ref.add_argument("--model-map", metavar="MAP", help="reference map on the same grid")
    ref.add_argument("--model-free", action="store_true", help="no model: expected scattering with a local B")
    parser.add_argument("--resolution", type=float, metavar="Å", required=True, help="global resolution (FSC 0.143)")
    parser.add_argument("--window", type=float, metavar="Å", default=25.0, help="window edge (default 25 Å)")
    parser.add_argument("--mask", metavar="MASK", default=None,
                        help="voxels to scale (> --mask-threshold); default the FDR mask of the map")
    parser.add_argument("--mask-threshold", type=float, default=0.5)
    parser.add_argument("--fdr", type=float, default=0.01, help="FDR of the default mask (default 0.01)")
    parser.add_argument("--mode", choices=["fast", "exact", "locscale2"], default="fast")
    parser.add_argument("--target-bfactor", type=float, metavar="Å²", default=20.0,
                        help="--model-free: decay B each window is brought to (default 20)")
    parser.add_argument("--wilson-cutoff", type=float, metavar="Å", default=10.0,
                        help="--model-free: low-resolution end of the local Guinier fit (default 10)")
    parser.add_argument("--no-refine", action="store_true", help="--model: keep the model's B-factors")
    parser.add_argument("--voxel-size", type=float, metavar="Å", default=None, help="override the header voxel size")
    add_compute_args(parser)


def _plot(vol, out_vol, mask, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..engine import spectral

    a = np.asarray(vol.values)
    b = np.asarray(out_vol.values)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    k = a.shape[0] // 2
    if mask is not None:
        m = np.asarray(mask.values) > 0.5
        if m.any():
            k = int(np.round(np.mean(np.nonzero(m)[0])))
    for ax, img, title in ((axes[0], a[k], "input"), (axes[1], b[k], "LocScale")):
        ax.imshow(img, origin="lower", cmap="gray")
        ax.set_title(f"{title}, z = {k}")
        ax.set_xticks([])
        ax.set_yticks([])
    for arr, label in ((vol, "input"), (out_vol, "LocScale")):
        p = spectral.radial_profile(spectral.rfft(arr.copy(data=np.asarray(arr.values))))
        sel = p.frequency > 0
        axes[2].semilogy(p.frequency[sel] ** 2, p.mean_amplitude()[sel], label=label)
    axes[2].set_xlabel("s² (1/Å²)")
    axes[2].set_ylabel("mean |F|")
    axes[2].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(args: argparse.Namespace) -> int:
    from ..io import open_map, open_model, save
    from ..kernels.locscale import window_voxels
    from ..ops.locscale import locscale, rscc
    from ..volume import voxel_size

    out = check_output(args.output, args.map, args.model_map, args.mask, args.model)
    t0 = time.perf_counter()
    vol = open_map(args.map, chunks=args.chunks, voxel_size=args.voxel_size)
    mm = open_map(args.model_map, chunks=args.chunks, voxel_size=args.voxel_size) if args.model_map else None
    mask = open_map(args.mask, chunks=args.chunks, voxel_size=args.voxel_size) if args.mask else None
    model = open_model(args.model) if args.model else None
    wn = window_voxels(args.window, voxel_size(vol))
    source = "model" if model is not None else ("model_map" if mm is not None else "model_free")
    with compute_session(args, nbytes_hint=int(vol.size) * 4 * (30 if args.mode == "fast" else 4)) as session:
        print(f"chunkem locscale: {args.map} {tuple(vol.shape)}, window {args.window:g} Å = {wn} voxels, "
              f"mode {args.mode}, reference {source}, on {session.describe()}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = locscale(vol, resolution=args.resolution, model=model, model_map=mm,
                              model_free=args.model_free, window=args.window, mask=mask, mode=args.mode,
                              target_bfactor=args.target_bfactor, wilson_cutoff=args.wilson_cutoff,
                              mask_threshold=args.mask_threshold, fdr=args.fdr, refine=not args.no_refine)
        t1 = time.perf_counter()
        save(result, out, progress=not args.no_progress)
        compute_info = session.to_dict()
    t_scale = time.perf_counter() - t1
    scaled = open_map(out)
    processed = np.asarray(scaled.values) != 0
    report = {
        "verb": "locscale", "input": args.map, "output": str(out), "mode": args.mode, "reference": source,
        "model": args.model, "model_map": args.model_map, "mask": args.mask or f"FDR mask at {args.fdr:g}",
        "resolution_A": args.resolution, "window_A": args.window, "window_voxels": list(wn),
        "n_scaled_voxels": int(processed.sum()),
        "rscc_input_output_in_scaled_voxels": rscc(np.asarray(vol.values)[processed], np.asarray(scaled.values)[processed])
        if processed.any() else None,
        "target_bfactor_A2": args.target_bfactor if args.model_free else None,
        "bfactor_convention": "decay: |F| ∝ exp(-B s²/4)",
        "warnings": [str(w.message) for w in caught],
        "compute": compute_info, "time_scale_and_write_s": round(t_scale, 3),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    jp = write_json(sidecar(out, ".json"), report)
    _plot(vol, scaled, mask if mask is not None else None, sidecar(out, ".png"))
    for w in caught:
        print(f"warning: {w.message}")
    print(f"scaled {report['n_scaled_voxels']} voxels; wrote {out} and {jp} in {report['elapsed_s']:.1f} s")
    return 0
