"""``bioinverse cryoem implicit …``: fit a coordinate network to a map, render it on any grid.

- ``fit MAP --out model.pt``: fits a SIREN (or a Fourier-feature MLP) to an MRC map, or to its
  central slice with ``--slice``; reports the FSC (FRC) of the render against the map, the Nyquist
  limit and the compression ratio; resumable from ``model.pt.ckpt`` until the model is written.
- ``render model.pt --out map.mrc``: evaluates the network on a box of any size and voxel size, with
  the MRC origin that overlays the fitted map.

See :mod:`bioinverse.cryoem.implicit` for the coordinates and the fitting recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Neural implicit representations of maps: fit, render.", no_args_is_help=True)


def _parse_shift(text: str | None, dimensions: int) -> tuple[float, ...] | None:
    import math

    from bioinverse.errors import InputError

    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != dimensions or not all(math.isfinite(v) for v in values):
        raise InputError("--shift", f"needs {dimensions} comma-separated numbers in Å (x,y{',z' if dimensions == 3 else ''}), "
                                    f"got {text!r}")
    return values


@app.command("fit")
def fit_command(
    map_path: Annotated[Path, typer.Argument(metavar="MAP", help="Map to represent (MRC).")],
    out: Annotated[Path, typer.Option("--out", help="Model file to write (.pt).")],
    network: Annotated[str, typer.Option("--network", help="siren or fourier (random Fourier features + "
                                                           "ReLU MLP).")] = "siren",
    hidden: Annotated[int, typer.Option("--hidden", help="Units per hidden layer.")] = 88,
    layers: Annotated[int, typer.Option("--layers", help="SIREN: sine layers after the first; fourier: "
                                                         "ReLU hidden layers.")] = 3,
    omega0: Annotated[float, typer.Option("--omega0", help="SIREN: ω0 of the first layer.")] = 30.0,
    hidden_omega0: Annotated[float, typer.Option("--hidden-omega0", help="SIREN: ω0 of the later layers.")] = 30.0,
    features: Annotated[int, typer.Option("--features", help="fourier: number of random frequencies.")] = 128,
    scale: Annotated[float, typer.Option("--scale", help="fourier: s.d. of the frequencies, cycles per half "
                                                         "box.")] = 4.0,
    steps: Annotated[int, typer.Option("--steps", help="Minibatch steps (rounded to whole passes).")] = 3200,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Coordinates per step.")] = 8192,
    lr: Annotated[float, typer.Option("--lr", help="Adam's initial learning rate (cosine decay to 1 %).")] = 1e-3,
    supersample: Annotated[int, typer.Option("--supersample", help="Fit the band-limited map on a grid this "
                                                                   "many times finer (better renders between "
                                                                   "voxels); 1: the voxels only.")] = 1,
    importance: Annotated[float, typer.Option("--importance", help="Share of the samples drawn from the "
                                                                   "molecule, in [0, 1).")] = 0.0,
    slice_axis: Annotated[str | None, typer.Option("--slice", help="Fit the central slice normal to x, y "
                                                                   "or z (a 2-D network).")] = None,
    pixel_size: Annotated[float | None, typer.Option("--pixel-size", help="Å per voxel; default: from the "
                                                                          "MRC header.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial weights and the sample order.")] = 0,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the FSC (FRC) curve as a PNG.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda, cuda:1, …")] = "auto",
) -> None:
    """Fit a coordinate network to a map (or its central slice) and write it to OUT."""
    from bioinverse.cryoem.cli import _positive
    from bioinverse.cryoem.implicit import Architecture, FitSettings, central_slice, fit_map
    from bioinverse.cryoem.io import read_map, read_map_origin
    from bioinverse.errors import InputError

    volume, voxel = read_map(map_path)
    if len(set(volume.shape)) != 1:
        raise InputError(map_path, f"is not a cubic box: {volume.shape}")
    voxel = voxel if pixel_size is None else _positive(pixel_size, "--pixel-size")
    origin = read_map_origin(map_path)
    if slice_axis is not None:
        volume = central_slice(volume, slice_axis)
        keep = {"z": (0, 1), "y": (0, 2), "x": (1, 2)}[slice_axis]  # in-plane axes, x y z order
        origin = tuple(origin[i] for i in keep)
    architecture = Architecture(kind=network, hidden_features=hidden, hidden_layers=layers, first_omega0=omega0,
                                hidden_omega0=hidden_omega0, n_features=features, scale=scale, seed=seed)
    settings = FitSettings(steps=steps, batch_size=batch_size, lr=lr, supersample=supersample,
                           importance=importance, seed=seed)
    dimensions = volume.ndim
    what = "map" if dimensions == 3 else f"central {slice_axis} slice"
    n_parameters = architecture.n_parameters(dimensions)
    typer.echo(f"{map_path.name}: {what} of {volume.shape[0]}^{dimensions} voxels, {voxel:g} Å/voxel")
    typer.echo(f"{network} network, {n_parameters:,} parameters: compression ratio "
               f"{volume.size / n_parameters:.1f}")
    checkpoint = out.with_name(out.name + ".ckpt")
    model = fit_map(volume, voxel, origin=origin, architecture=architecture, settings=settings,
                    checkpoint=checkpoint, progress=True, device=device)
    model.save(out)
    checkpoint.unlink(missing_ok=True)
    curve = model.evaluate(volume)
    name = "FSC" if dimensions == 3 else "FRC"
    typer.echo(f"fit: {model.record['steps']} steps in {model.record['seconds']:.1f} s, final MSE "
               f"{model.record['final_train_loss']:.3g} (standardised units)")
    typer.echo(f"resolution against the input ({name} 0.5): {curve.resolution(0.5):.2f} Å "
               f"(Nyquist {2 * voxel:.2f} Å)")
    typer.echo(f"wrote {out}")
    if plot is not None:
        from bioinverse.cryoem.figures import fsc_figure

        fsc_figure({f"{network} render vs {map_path.name}": curve}, plot, thresholds=(0.5,))
        typer.echo(f"plot: {plot}")


@app.command("render")
def render_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model written by `implicit fit`.")],
    out: Annotated[Path, typer.Option("--out", help="Map (or image) to write (MRC).")],
    box: Annotated[int | None, typer.Option("--box", help="Voxels per axis; default: the fitted box's edge "
                                                          "at the new voxel size.")] = None,
    apix: Annotated[float | None, typer.Option("--apix", help="Å per voxel; default: the fitted map's.")] = None,
    shift: Annotated[str | None, typer.Option("--shift", help="Centre of the rendered box relative to the "
                                                              "fitted one, Å, 'x,y,z'.")] = None,
    chunk: Annotated[int, typer.Option("--chunk", help="Points per forward pass (memory only).")] = 65536,
) -> None:
    """Evaluate a fitted network on any grid and write it as MRC, placed over the fitted map."""
    from bioinverse.cryoem.cli import _positive
    from bioinverse.cryoem.implicit import load_implicit
    from bioinverse.cryoem.io import write_map, write_stack

    model = load_implicit(model_path)
    pixel = model.pixel_size if apix is None else _positive(apix, "--apix")
    offset = _parse_shift(shift, model.dimensions)
    volume = model.render(box=box, pixel_size=pixel, shift=offset, chunk=chunk)
    n = volume.shape[0]
    if model.dimensions == 3:
        write_map(out, volume, pixel, origin=model.render_origin(n, pixel, offset))
    else:
        write_stack(out, volume[None], pixel)
    typer.echo(f"wrote {out} ({n}^{model.dimensions} voxels of {pixel:g} Å, fitted box {model.box} of "
               f"{model.pixel_size:g} Å)")
