"""The showcase: every finished pipeline, end to end, in one HTML report.

Each domain registers a demo with :func:`register_demo`; a demo receives a working directory and a
report :class:`~bioinverse.report.Section` and fills it with maps, curves and comparison tables.
Demos run on data they simulate or that ships with an installed package, in small sizes, so the
whole showcase stays within a few minutes on two CPU cores.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from bioinverse.errors import InputError
from bioinverse.report import Report, Section

__all__ = ["Demo", "register_demo", "registered_demos", "run_showcase"]

# Modules whose import registers demos, in the order they appear in the report.
DEMO_MODULES = [
    "bioinverse.showcase.core",
    "bioinverse.showcase.dmri",
    "bioinverse.showcase.dmri_microstructure",
    "bioinverse.showcase.cryoem",
    "bioinverse.showcase.cryoem_red",
    "bioinverse.showcase.cryoem_implicit",
]


@dataclass(frozen=True)
class Demo:
    """A registered showcase demo: ``run(workdir, section)`` fills ``section``."""

    name: str
    title: str
    run: Callable[[Path, Section], None]


_REGISTRY: dict[str, Demo] = {}


def register_demo(name: str, title: str) -> Callable[[Callable[[Path, Section], None]], Callable[[Path, Section], None]]:
    """Decorator registering ``func(workdir, section)`` as the showcase demo ``name``."""

    def decorate(func: Callable[[Path, Section], None]) -> Callable[[Path, Section], None]:
        if name in _REGISTRY and _REGISTRY[name].run is not func:
            raise ValueError(f"a showcase demo named {name!r} is already registered")
        _REGISTRY[name] = Demo(name, title, func)
        return func

    return decorate


def registered_demos() -> list[Demo]:
    """All demos, after importing the modules that register them."""
    for module in DEMO_MODULES:
        importlib.import_module(module)
    return list(_REGISTRY.values())


def run_showcase(out: str | Path, only: list[str] | None = None, console: Console | None = None) -> tuple[Path, list[str]]:
    """Run the demos and write ``out/index.html``.

    Parameters
    ----------
    out : path
        Output directory (created); each demo gets ``out/<name>/`` for its own files.
    only : list of str, optional
        Names of the demos to run (default: all).

    Returns
    -------
    report : Path
        The written ``index.html``.
    failed : list of str
        Names of demos that raised; their traceback is shown in the report.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    demos = registered_demos()
    if only:
        known = {d.name for d in demos}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise InputError("--only", f"unknown demo {unknown[0]!r}; choose from {', '.join(sorted(known))}")
        demos = [d for d in demos if d.name in only]
    console = console or Console(stderr=True)
    report = Report("bioinverse showcase", "Forward models, classical and learned estimators, side by side.")
    summary = report.section("Summary")
    rows, failed = [], []
    for demo in demos:
        section = report.section(demo.title)
        workdir = out / demo.name
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with console.status(f"showcase: {demo.title} …"):
            try:
                demo.run(workdir, section)
                status = "ok"
            except Exception:  # a failing demo must not hide the others
                failed.append(demo.name)
                status = "failed"
                section.error(traceback.format_exc())
        seconds = time.perf_counter() - start
        console.print(f"showcase: {demo.name:10s} {status:6s} {seconds:6.1f} s")
        rows.append([demo.title, status, round(seconds, 1)])
    summary.table(rows, header=["demo", "status", "seconds"])
    return report.save(out / "index.html"), failed
