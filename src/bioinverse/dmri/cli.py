"""``bioinverse dmri …`` commands: gtab, simulate, fit, train, predict (+ the microstructure commands).

Every command reads and writes NIfTI + FSL ``bvals``/``bvecs``; maps are written one file per
measure (``<out>/<measure>.nii.gz``), each atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Diffusion MRI: gradient tables, signal models, microstructure estimators.", no_args_is_help=True)

_MODELS = ("dki", "noddi")
_DKI_MAPS = ("md", "fa", "ad", "rd", "mk", "ak", "rk", "kfa")
_NODDI_MAPS = ("odi", "icvf", "isovf")

BvalsOpt = Annotated[Path, typer.Option("--bvals", help="FSL bvals file (s/mm²).")]
BvecsOpt = Annotated[Path, typer.Option("--bvecs", help="FSL bvecs file.")]
MaskOpt = Annotated[Optional[Path], typer.Option("--mask", help="Brain mask NIfTI (non-zero = inside).")]


@app.command()
def gtab(
    bvals: Annotated[Path, typer.Argument(help="FSL bvals file (s/mm²).")],
    bvecs: Annotated[Path, typer.Argument(help="FSL bvecs file.")],
    b0_threshold: Annotated[float, typer.Option(help="b-values at or below it (s/mm²) count as b=0.")] = 50.0,
) -> None:
    """Validate an FSL gradient table and print its shells."""
    from bioinverse.dmri.io import read_bvals_bvecs

    table = read_bvals_bvecs(bvals, bvecs, b0_threshold)
    typer.echo(f"{len(table)} volumes, {int(table.b0s_mask.sum())} with b ≤ {b0_threshold:g} s/mm²")
    for b, count in table.shells():
        typer.echo(f"  b = {b:7.1f} s/mm²: {count} volumes")


def _parse_shape(text: str) -> tuple[int, int, int]:
    from bioinverse.errors import InputError

    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError("--shape", f"must be three integers like 56,64,16, got {text!r}") from None
    if len(shape) != 3:
        raise InputError("--shape", f"must be three integers like 56,64,16, got {text!r}")
    return shape  # type: ignore[return-value]


@app.command()
def simulate(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    protocol: Annotated[str, typer.Option(help="three-shell (148 DWIs), five-shell (158) or noddi (99).")] = "three-shell",
    bvals: Annotated[Optional[Path], typer.Option(help="Use this FSL bvals file instead of a named protocol.")] = None,
    bvecs: Annotated[Optional[Path], typer.Option(help="FSL bvecs file (with --bvals).")] = None,
    snr: Annotated[float, typer.Option(help="SNR of the white-matter b=0 signal (Rician noise).")] = 20.0,
    seed: Annotated[int, typer.Option(help="Subject: geometry, microstructure and noise.")] = 0,
    shape: Annotated[str, typer.Option(help="Grid size X,Y,Z.")] = "56,64,16",
    tissue: Annotated[str, typer.Option(help="Tissue model: noddi (sticks; DKI and NODDI truth) or multi-tensor (Gaussian tensors; DKI truth).")] = "noddi",
) -> None:
    """Write a brain-like phantom: DWI NIfTI, bvals/bvecs, mask and ground-truth maps."""
    from bioinverse.dmri.acquisition import PROTOCOLS
    from bioinverse.dmri.io import read_bvals_bvecs
    from bioinverse.dmri.phantom import simulate_phantom
    from bioinverse.errors import InputError

    if (bvals is None) != (bvecs is None):
        raise InputError("--bvals/--bvecs", "give both files or neither")
    if bvals is not None:
        table = read_bvals_bvecs(bvals, bvecs)
    elif protocol in PROTOCOLS:
        table = PROTOCOLS[protocol]()
    else:
        raise InputError("--protocol", f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    phantom = simulate_phantom(table, snr=snr, seed=seed, shape=_parse_shape(shape), tissue_model=tissue)
    paths = phantom.write(out)
    typer.echo(f"{int(phantom.mask.sum())} brain voxels × {len(table)} volumes, SNR {snr:g}, seed {seed}")
    typer.echo(f"wrote {paths['dwi']} (+ bvals, bvecs, mask and {len(phantom.maps)} truth maps)")


def _write_maps(out: Path, dwi, maps: dict, prefix: str = "") -> None:
    from bioinverse.dmri.io import write_map

    out.mkdir(parents=True, exist_ok=True)
    for name, values in maps.items():
        path = out / f"{prefix}{name}.nii.gz"
        write_map(path, dwi.unmask(values), dwi.affine)
        typer.echo(f"wrote {path}")


def _fit_maps(model: str, dwi, progress: bool, constrained: bool = True) -> dict:
    """Classical fit of the masked voxels of ``dwi``; returns {map name: (N,) values}."""
    from bioinverse.errors import InputError

    signals = dwi.voxels()
    if model == "dki":
        from bioinverse.dmri.dki import DKIModel

        fit = DKIModel(dwi.gtab, constrained=constrained).fit(signals, progress=progress)
        return {name: getattr(fit, name) for name in _DKI_MAPS}
    if model == "noddi":
        from bioinverse.dmri.noddi import NODDIModel

        fit = NODDIModel(dwi.gtab).fit(signals, progress=progress)
        return {name: getattr(fit, name) for name in _NODDI_MAPS}
    raise InputError("--model", f"unknown model {model!r}; choose from {', '.join(_MODELS)}")


@app.command()
def fit(
    dwi: Annotated[Path, typer.Argument(help="4D diffusion series (NIfTI).")],
    bvals: BvalsOpt,
    bvecs: BvecsOpt,
    out: Annotated[Path, typer.Option(help="Output directory for the maps.")],
    mask: MaskOpt = None,
    model: Annotated[str, typer.Option(help="dki (MD, FA, AD, RD, MK, AK, RK, KFA) or noddi (ODI, ICVF, ISOVF).")] = "dki",
    constrained: Annotated[bool, typer.Option(help="DKI: enforce D(n) ≥ 0 and K(n) ≥ 0 on 100 directions (--no-constrained reproduces dipy's WLS).")] = True,
) -> None:
    """Fit a classical model voxel by voxel and write its maps."""
    from bioinverse.dmri.io import read_dwi

    data = read_dwi(dwi, bvals, bvecs, mask)
    maps = _fit_maps(model, data, progress=True, constrained=constrained)
    _write_maps(out, data, maps)


def _parse_targets(targets: list[str]) -> dict[str, Path]:
    from bioinverse.errors import InputError

    parsed = {}
    for item in targets:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError("--target", f"must look like NAME=PATH (e.g. rk=truth_rk.nii.gz), got {item!r}")
        parsed[name] = Path(path)
    return parsed


def _map_in_mask(path: Path, dwi):
    """The voxels of map ``path`` inside the mask of ``dwi``; the map must be on the DWI grid."""
    from bioinverse.dmri.io import read_map
    from bioinverse.errors import InputError

    values, _ = read_map(path)
    if values.shape != dwi.data.shape[:3]:
        raise InputError(path, f"has shape {values.shape}, the DWI grid is {dwi.data.shape[:3]}")
    return values[dwi.mask]


@app.command()
def train(
    dwi: Annotated[Path, typer.Argument(help="4D diffusion series of the training subject, full protocol.")],
    bvals: BvalsOpt,
    bvecs: BvecsOpt,
    out: Annotated[Path, typer.Option(help="Model file to write (.pt).")],
    mask: MaskOpt = None,
    n_dwis: Annotated[int, typer.Option(help="Size of the subsampled scheme the network reads (one b=0 + n-1 DWIs).")] = 12,
    pattern_seed: Annotated[int, typer.Option(help="Seed of the pseudorandom subsampling pattern.")] = 0,
    fit_targets: Annotated[Optional[str], typer.Option(help="Targets from a classical fit of the FULL training scan: dki or noddi.")] = None,
    outputs: Annotated[str, typer.Option(help="With --fit-targets: comma-separated measures to learn.")] = "rk,kfa,mk",
    target: Annotated[list[str], typer.Option(help="A target map NAME=PATH (repeatable), e.g. rk=truth_rk.nii.gz.")] = [],  # noqa: B006
    labels: Annotated[Optional[Path], typer.Option(help="Tissue label map: train a segmentation network instead.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint file; an interrupted run resumes from it.")] = None,
    max_epochs: Annotated[int, typer.Option(help="Upper bound on epochs (early stopping usually ends sooner).")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, validation split and data order.")] = 0,
) -> None:
    """Train a q-space network (Golkov et al. 2016) from a subsampled scheme to maps or labels."""
    import numpy as np

    from bioinverse.dmri.acquisition import subsample_pattern
    from bioinverse.dmri.io import read_dwi
    from bioinverse.dmri.qspace import QSpaceNet, qdl_train_config
    from bioinverse.errors import InputError

    data = read_dwi(dwi, bvals, bvecs, mask)
    chosen = sum(x is not None and x != [] for x in (fit_targets, target or None, labels))
    if chosen != 1:
        raise InputError("--fit-targets/--target/--labels", "give exactly one source of training targets")
    signals = data.voxels()
    scheme = data.gtab.subset(subsample_pattern(data.gtab, n_dwis, seed=pattern_seed))
    config = qdl_train_config(max_epochs, checkpoint=checkpoint)
    if labels is not None:
        y = np.rint(_map_in_mask(labels, data)).astype(np.int64)
        estimator = QSpaceNet(scheme, task="classification", config=config, seed=seed)
    else:
        if fit_targets is not None:
            names = [n.strip() for n in outputs.split(",") if n.strip()]
            maps = _fit_maps(fit_targets, data, progress=True)
            unknown = [n for n in names if n not in maps]
            if unknown:
                raise InputError("--outputs", f"{unknown[0]!r} is not a {fit_targets} measure; choose from {', '.join(maps)}")
        else:
            names, maps = [], {}
            for name, path in _parse_targets(target).items():
                names.append(name)
                maps[name] = _map_in_mask(path, data)
        y = np.stack([maps[n] for n in names], axis=1)
        estimator = QSpaceNet(scheme, task="regression", outputs=names, config=config, seed=seed)
    estimator.fit(signals, data.gtab, y, progress=True)
    estimator.save(out)
    result = estimator.train_result_
    typer.echo(f"trained {result.epochs_run} epochs (best {result.best_epoch}, validation loss "
               f"{result.best_val_loss:.4g}) on {len(signals)} voxels, {n_dwis} of {len(data.gtab)} volumes")
    typer.echo(f"wrote {out}")


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Model written by `bioinverse dmri train`.")],
    dwi: Annotated[Path, typer.Argument(help="4D diffusion series containing the model's scheme.")],
    bvals: BvalsOpt,
    bvecs: BvecsOpt,
    out: Annotated[Path, typer.Option(help="Output directory for the maps.")],
    mask: MaskOpt = None,
) -> None:
    """Apply a trained q-space network to a new scan and write its maps (or labels)."""
    from bioinverse.dmri.io import read_dwi
    from bioinverse.dmri.qspace import QSpaceNet

    estimator = QSpaceNet.load(model)
    data = read_dwi(dwi, bvals, bvecs, mask)
    signals = data.voxels()
    if estimator.task == "classification":
        proba = estimator.predict_proba(signals, data.gtab)
        maps = {"labels": estimator.classes_[proba.argmax(axis=1)].astype("float32")}
        maps.update({f"p_{c}": proba[:, i] for i, c in enumerate(estimator.classes_)})
    else:
        maps = estimator.predict_maps(signals, data.gtab)
    _write_maps(out, data, maps)


# The axon-microstructure commands (scheme, crossings, peaks, dictionary, fingerprint, hybrid,
# learned) live in their own module and register themselves on `app` when imported.
from bioinverse.dmri import cli_microstructure as _microstructure_commands  # noqa: E402, F401
