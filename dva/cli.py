"""The `dva` command line: thin commands that parse, call the library and write files."""

from __future__ import annotations

import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dva import __version__
from dva.errors import DvaFormatWarning, DvaInputError

app = typer.Typer(
    help="dva: 3D Variability Analysis for cryo-EM on dask.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print format warnings and a DvaInputError as one line each on stderr; exit code 2 on error."""
    # SIGTERM unwinds like Ctrl-C, so temporary outputs are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with warnings.catch_warnings():
        warnings.simplefilter("always", DvaFormatWarning)
        warnings.showwarning = _show_warning
        try:
            yield
        except DvaInputError as exc:
            print(f"dva: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None


@contextmanager
def progress_bar(description: str, total: int, *, quiet: bool = False) -> Iterator:
    """A rich progress bar (plain when stderr is not a terminal); yields `advance(n)`."""
    if quiet:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _version(value: bool) -> None:
    if value:
        print(f"dva {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """dva: 3D Variability Analysis for cryo-EM on dask."""


@app.command("import")
def import_cmd(
    input: Annotated[Path, typer.Argument(help="Particles: RELION .star or CryoSPARC .cs.")],
    out: Annotated[Path, typer.Option("--out", help="The zarr store to write (STORE.zarr).")],
    datadir: Annotated[Path | None, typer.Option(help="Folder the image paths are relative to.")] = None,
    passthrough: Annotated[Path | None, typer.Option(help="CryoSPARC passthrough .cs joined on uid.")] = None,
    box: Annotated[int | None, typer.Option(help="Fourier-crop images to this box (pixels).")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Particles per chunk (default: ~128 MB).")] = None,
    data_sign: Annotated[str, typer.Option(help="auto (from metadata), 1 or -1.")] = "auto",
    max_particles: Annotated[int | None, typer.Option(help="Import only the first N particles.")] = None,
    pixel_size: Annotated[
        float | None, typer.Option(help="Pixel size in Å, replacing the .star's (needed when it has none).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Import particles and their images into a chunked zarr store."""
    from dva.io.particles import read_particles
    from dva.io.store import import_particles, summary

    with _user_errors():
        if out.exists() and not overwrite:
            raise DvaInputError(f"{out}: already exists (use --overwrite to replace it)")
        table = read_particles(input, datadir=datadir, passthrough=passthrough, pixel_size_A=pixel_size)
        n = min(table.sizes["particle"], max_particles or table.sizes["particle"])
        with progress_bar("importing", n, quiet=quiet) as advance:
            import_particles(
                table,
                out,
                box=box,
                chunk_size=chunk_size,
                data_sign=data_sign,
                max_particles=max_particles,
                progress=advance,
            )
        print(summary(out))


@app.command()
def info(store: Annotated[Path, typer.Argument(help="A store written by dva import.")]) -> None:
    """Print a summary of a particle store."""
    from dva.io.store import summary

    with _user_errors():
        print(summary(store))


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the dataset into.")],
    preset: Annotated[str, typer.Option(help="tiny, small or large.")] = "small",
    particles: Annotated[int | None, typer.Option(help="Number of particles (default: the preset's).")] = None,
    snr: Annotated[float | None, typer.Option(help="Signal-to-noise ratio (default: the preset's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Simulate a heterogeneous dataset with known truth (particles.star/.mrcs/.cs, mask, truth)."""
    from dva.sim.simulate import PRESETS, simulate_dataset

    with _user_errors():
        if preset not in PRESETS:
            raise DvaInputError(f"--preset {preset}: use one of {', '.join(PRESETS)}")
        n = particles or PRESETS[preset].particles
        with progress_bar("simulating", n, quiet=quiet) as advance:
            simulate_dataset(out, preset, particles=particles, snr=snr, seed=seed, progress=advance)
        print(f"wrote {out}/particles.star, particles.mrcs, particles.cs, mask.mrc, truth/")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")] = Path("dva-demo"),
    preset: Annotated[str, typer.Option(help="Simulation preset.")] = "small",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Simulate a dataset, import it and summarise the store."""
    from dva.io.particles import read_particles
    from dva.io.store import import_particles, summary
    from dva.sim.simulate import PRESETS, simulate_dataset

    with _user_errors():
        n = PRESETS[preset].particles
        with progress_bar("simulating", n, quiet=quiet) as advance:
            simulate_dataset(out / "sim", preset, progress=advance)
        store = out / "particles.zarr"
        table = read_particles(out / "sim" / "particles.star")
        with progress_bar("importing", n, quiet=quiet) as advance:
            import_particles(table, store, progress=advance)
        print(summary(store))
