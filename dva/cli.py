"""The `dva` command line: thin commands that parse, call the library and write files."""

from __future__ import annotations

import json
import logging
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dva import __version__
from dva.errors import DvaClusterError, DvaFormatWarning, DvaInputError
from dva.io.results import write_results
from dva.io.table import check_source

app = typer.Typer(
    help="dva: 3D Variability Analysis for cryo-EM on dask.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


Scheduler = Annotated[
    str | None,
    typer.Option(help="Address of a running dask scheduler (tcp://… or tls://…; or DASK_SCHEDULER_ADDRESS)."),
]
Workers = Annotated[
    int | None,
    typer.Option(help="Workers of the embedded CPU cluster (default: one per core this process may run on)."),
]
Gpus = Annotated[str | None, typer.Option(help="GPUs of the embedded cluster (e.g. 0,1), or none for CPU.")]
MemoryLimit = Annotated[str | None, typer.Option(help="Memory limit per worker of the embedded cluster (e.g. 8GB).")]
TlsCaFile = Annotated[Path | None, typer.Option(help="TLS: the CA certificate (PEM) of the scheduler's cluster.")]
TlsCert = Annotated[Path | None, typer.Option(help="TLS: this client's certificate (PEM).")]
TlsKey = Annotated[Path | None, typer.Option(help="TLS: this client's private key (PEM).")]


def _connect(scheduler, workers, gpus, memory_limit, tls_ca_file, tls_cert, tls_key):
    """The cluster a command runs on (see `dva.engine.cluster.connect`)."""
    from dva.engine.cluster import connect, tls_security

    security = tls_security(tls_ca_file, tls_cert, tls_key)
    return connect(scheduler, workers=workers, gpus=gpus, memory_limit=memory_limit, security=security)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _stop(signum: int, frame) -> None:
    """Ctrl-C or SIGTERM: unwind (so temporary outputs are removed and the run says where it
    stopped), with logging off: the cluster's teardown then logs cancelled callbacks, closed comms
    and lost scattered data as errors with tracebacks, which say nothing to the user."""
    logging.disable(logging.CRITICAL)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print format warnings, a DvaInputError (exit code 2) and a DvaClusterError (exit code 1) as one
    line each on stderr."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DvaFormatWarning)
        warnings.showwarning = _show_warning
        try:
            yield
        except (DvaInputError, DvaClusterError) as exc:
            print(f"dva: error: {exc}", file=sys.stderr)
            raise typer.Exit(2 if isinstance(exc, DvaInputError) else 1) from None


@contextmanager
def progress_bar(description: str, total: int, *, quiet: bool = False) -> Iterator:
    """A rich progress bar on a terminal, plain lines (every 10%) otherwise; yields `advance(n)`."""
    if quiet:
        yield lambda n: None
        return
    if not sys.stderr.isatty():
        done, shown = 0, -1

        def advance(n: int) -> None:
            nonlocal done, shown
            done += n
            tenth = 10 * done // max(total, 1)
            if tenth > shown:
                shown = tenth
                print(f"{description}: {done:,}/{total:,}", file=sys.stderr, flush=True)

        yield advance
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
def run(
    input: Annotated[
        str, typer.Argument(help="A store from dva import (a path or an fsspec URL), or particles (.star / .cs).")
    ],
    mask: Annotated[Path, typer.Option(help="Mask (MRC); matched to the data's box and pixel size.")],
    filter_res: Annotated[float, typer.Option(help="Low-pass filter resolution in Å (required).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the results.")],
    modes: Annotated[int, typer.Option(help="Number of components K.")] = 3,
    iterations: Annotated[int, typer.Option(help="EM iterations.")] = 20,
    filter_order: Annotated[float, typer.Option(help="Butterworth order of the low-pass.")] = 1.5,
    highpass_res: Annotated[float | None, typer.Option(help="High-pass resolution in Å (off by default).")] = None,
    highpass_order: Annotated[float, typer.Option(help="Butterworth order of the high-pass.")] = 8.0,
    lam: Annotated[float, typer.Option("--lambda", help="M-step regularisation (relative).")] = 0.01,
    scale: Annotated[str, typer.Option(help="Per-particle scale: optimal, input or none.")] = "optimal",
    noise: Annotated[str, typer.Option(help="Noise model: colored or white.")] = "colored",
    gram_schmidt: Annotated[bool, typer.Option(help="Orthonormalise components every iteration.")] = True,
    box: Annotated[int | None, typer.Option(help="Fourier-crop to this box on the fly (pixels).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the initial components.")] = 0,
    max_particles: Annotated[int | None, typer.Option(help="Use only the first N particles.")] = None,
    band_tolerance: Annotated[
        float,
        typer.Option(
            help="Skip the Fourier pixels where the filters leave the components less than this weight "
            "(0: every pixel; 0.05 is faster and changes results slightly, see README)."
        ),
    ] = 0.0,
    prefix: Annotated[str, typer.Option(help="Prefix of the output files.")] = "dva",
    scheduler: Scheduler = None,
    workers: Workers = None,
    gpus: Gpus = None,
    memory_limit: MemoryLimit = None,
    tls_ca_file: TlsCaFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from DIR/checkpoint/ (saved after every iteration) with the same inputs.")
    ] = False,
    datadir: Annotated[Path | None, typer.Option(help="Folder the image paths are relative to.")] = None,
    passthrough: Annotated[Path | None, typer.Option(help="CryoSPARC passthrough .cs joined on uid.")] = None,
    halfsets: Annotated[
        bool, typer.Option(help="Also fit each half-set alone and report per-mode FSC and coordinate agreement.")
    ] = False,
    performance_report: Annotated[
        Path | None, typer.Option(help="Write dask's performance report (HTML) of the run here.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """3D Variability Analysis: the mean and K components, and K coordinates per particle.

    Also writes DIR/run.log (the parameters, one line per iteration, timings) and, after every
    iteration, DIR/checkpoint/ (Ctrl-C, SIGTERM or a lost driver lose at most one iteration: --resume)."""
    from dva.engine.loop import RunParams, resume_point
    from dva.io.store import store_location

    with _user_errors():
        params = RunParams(
            filter_res_A=filter_res,
            modes=modes,
            iterations=iterations,
            filter_order=filter_order,
            highpass_res_A=highpass_res,
            highpass_order=highpass_order,
            lam=lam,
            scale=scale,
            noise=noise,
            gram_schmidt=gram_schmidt,
            box=box,
            seed=seed,
            max_particles=max_particles,
            halfsets=halfsets,
            band_tolerance=band_tolerance,
        )
        if not mask.is_file():
            raise DvaInputError(f"{mask}: mask not found")
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / "checkpoint"
        try:
            # The cluster first: a worker without the memory for the passes is named before an import.
            cluster = _connect(scheduler, workers, gpus, memory_limit, tls_ca_file, tls_cert, tls_key)
            with (
                closing(cluster),
                _store_for(
                    input,
                    out,
                    datadir,
                    passthrough,
                    max_particles,
                    quiet,
                    lambda full: _check_memory(cluster, full, params),
                ) as store,
            ):
                done = resume_point(checkpoint, store, params).iteration if resume else 0
                result, table, backend = _run_job(
                    input, store, mask, params, out, checkpoint, resume, done, quiet, performance_report, cluster
                )
                if result.data_sign < 0:
                    print(
                        "warning: the mean came out negative inside the mask: images were used inverted "
                        "(black on white); check --data-sign at import",
                        file=sys.stderr,
                    )
                job = {
                    "input": store_location(input),
                    "mask": str(mask.absolute()),
                    "datadir": str(datadir.absolute()) if datadir else None,
                    "passthrough": str(passthrough.absolute()) if passthrough else None,
                    "backend": backend,
                }
                write_results(out, prefix, result, table, job)
        except (KeyboardInterrupt, SystemExit) as stop:
            code = 130 if isinstance(stop, KeyboardInterrupt) else stop.code
            _stopped(checkpoint, "Ctrl-C" if code == 130 else f"signal {code - 128}", iterations)
            raise typer.Exit(code) from None
        print(
            f"explained by {modes} components: {result.metrics[-1]['explained']:.3%} of the residual power"
            if result.metrics
            else ""
        )
        print(
            f"wrote {out}/ ({prefix}_map.mrc, {prefix}_component_*.mrc, {prefix}_particles.cs/.star, job.json) in {result.timings['total_s']:.0f} s"
        )


def _stopped(checkpoint: Path, cause: str, iterations: int) -> None:
    """The one line `dva run` prints when stopped by a signal: where it stopped and how to go on."""
    from dva.engine.checkpoint import load_checkpoint

    try:
        done = load_checkpoint(checkpoint).iteration
    except DvaInputError:
        print(f"dva run: stopped ({cause}) before the mean pass ended; nothing to resume", file=sys.stderr)
        return
    print(
        f"dva run: stopped ({cause}); iterations 1–{done} of {iterations} are saved in {checkpoint}: "
        f"run the same command with --resume to continue",
        file=sys.stderr,
    )


def _run_job(input, store, mask, params, out, checkpoint, resume, done, quiet, performance_report, cluster):
    """`dva run`'s work on `cluster` (closed at the end): the run, with run.log and the progress bar;
    returns the result, the table of its particles and the backend."""
    from dva.engine.loop import run_3dva

    try:
        _, table, _ = open_store_table(store, params.max_particles)
        if table.attrs["source_format"] in ("star", "cs"):
            check_source(table)  # the outputs carry its columns: fail now, not after the run
        if not quiet:
            print(f"dask dashboard: {cluster.client.dashboard_link}", file=sys.stderr)
        with (
            open(out / "run.log", "a" if resume else "w", buffering=1) as log,
            _iteration_bar(params.iterations, quiet, done) as report,
            _performance_report(performance_report),
        ):
            log.write(
                f"dva {__version__} run {input} on {cluster.backend}; dashboard {cluster.client.dashboard_link}\n"
            )
            log.write(
                f"{'resumed at iteration ' + str(done) + ' ' if resume else ''}parameters {json.dumps(asdict(params))}\n"
            )

            def progress(metrics: dict) -> None:
                report(metrics)
                log.write(f"iteration {json.dumps(metrics)}\n")

            result = run_3dva(store, mask, params, cluster, progress=progress, checkpoint=checkpoint, resume=resume)
            if result.halves is not None:
                summary = {k: result.halves[k] for k in ("resolution_A", "coordinate_correlation", "particles")}
                log.write(f"halfsets {json.dumps(summary)}\n")
            log.write(f"timings_s {json.dumps(result.timings)}\n")
    finally:
        cluster.close()
    return result, table.isel(particle=slice(0, result.particles)), cluster.backend


@contextmanager
def _performance_report(path: Path | None) -> Iterator[None]:
    """dask's performance report of the enclosed work, written to `path` (nothing when None)."""
    if path is None:
        yield
        return
    from distributed import performance_report

    with performance_report(filename=str(path)):
        yield


def open_store_table(store: Path, n: int | None):
    """The store's images, its first `n` table rows (all when None), and attributes."""
    from dva.io.store import open_store

    images, table, attrs = open_store(store)
    return images, table.isel(particle=slice(0, n)), attrs


def _check_memory(cluster, full: int, params) -> None:
    """Before an import of images of box `full`: every worker has the memory for the passes of a
    run of `params` at its `--box` (at most `full`: a larger one the run refuses, after the import)
    (`dva.engine.placement.measure_memory`)."""
    from dva.engine.loop import pass_sums
    from dva.engine.placement import measure_memory

    box = min(params.box or full, full)
    measure_memory(cluster.client, cluster.backend, box, pass_sums(box, params.modes))


@contextmanager
def _store_for(
    input: str | Path,
    out: Path,
    datadir: Path | None,
    passthrough: Path | None,
    max_particles: int | None,
    quiet: bool,
    before_import: Callable[[int], None] | None = None,
) -> Iterator[str | Path]:
    """`input` itself when it is a store (a folder or an fsspec URL); else a temporary store imported
    into `out` and removed after, `before_import(box)` (when given) called first with the images'
    box."""
    import shutil
    import tempfile

    from dva.io.particles import read_particles
    from dva.io.store import import_particles, open_stacks

    if "://" in str(input) or Path(input).is_dir():
        yield input
        return
    table = read_particles(Path(input), datadir=datadir, passthrough=passthrough)
    if before_import is not None:
        before_import(open_stacks(table)[0].box)
    tmp = Path(tempfile.mkdtemp(prefix=".dva-import-", dir=out))
    try:
        n = min(table.sizes["particle"], max_particles or table.sizes["particle"])
        with progress_bar("importing", n, quiet=quiet) as advance:
            import_particles(table, tmp / "particles.zarr", max_particles=max_particles, progress=advance)
        yield tmp / "particles.zarr"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _iteration_bar(iterations: int, quiet: bool, done: int = 0) -> Iterator:
    """A progress bar over iterations (`done` of them already) showing the subspace change and the
    explained power (a plain line per iteration when stderr is not a terminal)."""
    if quiet:
        yield lambda metrics: None
        return
    if not sys.stderr.isatty():
        yield lambda m: print(
            f"EM iteration {m['iteration']}/{iterations}: Δsubspace {m['subspace_change_deg']:.2f}°  "
            f"explained {m['explained']:.2%}",
            file=sys.stderr,
            flush=True,
        )
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns) as bar:
        task = bar.add_task("EM iterations", total=iterations, completed=done, info="")
        yield lambda m: bar.update(
            task, advance=1, info=f"Δsubspace {m['subspace_change_deg']:.2f}°  explained {m['explained']:.2%}"
        )


@app.command()
def bench(
    particles: Annotated[int, typer.Option(help="Synthetic particles.")] = 20_000,
    box: Annotated[int, typer.Option(help="Box in pixels.")] = 64,
    modes: Annotated[int, typer.Option(help="Components K.")] = 3,
    chunk_size: Annotated[int | None, typer.Option(help="Particles per store chunk.")] = None,
    workers: Annotated[int | None, typer.Option(help="Workers of the embedded CPU cluster.")] = None,
    gpus: Annotated[str | None, typer.Option(help="GPUs to use (e.g. 0,1), or none.")] = None,
    iterations: Annotated[int, typer.Option(help="Iterations to time.")] = 3,
    scheduler: Annotated[str | None, typer.Option(help="Address of a running dask scheduler.")] = None,
    streamed: Annotated[
        bool, typer.Option(help="Keep no chunk resident: re-read all from the store every pass.")
    ] = False,
    on_host: Annotated[
        bool,
        typer.Option(
            help="Keep no chunk in GPU memory: GPU workers keep them prepared in host memory and copy them "
            "over every pass (CPU workers: as --streamed)."
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(help="Folder to keep the synthetic dataset in, reused there by runs of the same size."),
    ] = None,
    json_line: Annotated[
        bool, typer.Option("--json", help="Print the results as one JSON line (progress still goes to stderr).")
    ] = False,
) -> None:
    """Benchmark the E/M iterations: time per iteration, particles/s, peak memory per worker (each
    iteration's time on stderr as it ends)."""
    from dva.engine.bench import bench as run_bench

    with _user_errors():
        if streamed and on_host:
            raise DvaInputError("--streamed and --on-host: choose one")
        found = run_bench(
            particles,
            box,
            modes,
            chunk_size=chunk_size,
            workers=workers,
            gpus=gpus,
            iterations=iterations,
            scheduler=scheduler,
            streamed=streamed,
            on_host=on_host,
            data=data,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    if json_line:
        print(json.dumps(found))
        return
    print(
        f"{found['particles']:,} particles, box {box}, K={modes}, {found['workers']} {found['backend']} worker(s): "
        f"median {found['median_iteration_s']:.2f} s per iteration = {found['particles_per_s']:,.0f} particles/s; "
        f"peak memory per worker {', '.join(f'{m:.0f}' for m in found['peak_worker_rss_mb'])} MB"
    )
    print(
        f"whole run {found['run_s']:.1f} s ({found['mean_pass_s']:.1f} s of it the mean's pass), "
        f"after {found['cluster_start_s']:.1f} s starting the cluster"
    )
    phases = found["phases_s"]
    print(
        f"per iteration: workers' passes {phases['passes']:.2f} s, collecting their sums {phases['collect']:.2f} s, "
        f"driver's M-step {phases['mstep']:.2f} s"
    )
    floor, work = found["floor"], found["floor"]["work"]
    moved = f", host→device {floor['read_s']:.3f}" if "read_s" in floor else ""
    print(
        f"floor at {floor['ceilings']['device']}: {work['band_pixels']:,} band pixels per image; per iteration "
        f"{work['bytes_resident'] / 1e9:.2f} GB read, {work['gathers'] / 1e9:.2f} G gathers, "
        f"{work['scatter_adds'] / 1e9:.2f} G scatter-adds → {floor['floor_s']:.3f} s "
        f"(memory {floor['memory_s']:.3f}, gather {floor['gather_s']:.3f}, scatter {floor['scatter_s']:.3f}{moved}); "
        f"measured {floor['measured_s']:.2f} s = {floor['measured_over_floor']:.1f}× the floor"
    )


def _component_list(text: str | None, modes: int) -> list[int]:
    """`--components 0,2,3` as 0-based indices of the run's components (all when None)."""
    if text is None:
        return list(range(modes))
    try:
        picked = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DvaInputError(f"--components {text}: give 0-based numbers separated by commas") from None
    bad = [k for k in picked if not 0 <= k < modes]
    if bad or not picked or len(set(picked)) != len(picked):
        raise DvaInputError(f"--components {text}: each of 0…{modes - 1} at most once")
    return picked


@app.command()
def display(
    results: Annotated[Path, typer.Argument(help="Output folder of dva run.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the display outputs.")],
    mode: Annotated[str, typer.Option(help="simple, intermediates or cluster.")] = "simple",
    frames: Annotated[int, typer.Option(help="Frames per component, or clusters.")] = 20,
    range_percentile: Annotated[float, typer.Option(help="Coordinate range: p-th to (100−p)-th percentile.")] = 3.0,
    components: Annotated[str | None, typer.Option(help="0-based components, e.g. 0,2 (default all).")] = None,
    window: Annotated[
        int, typer.Option(help="intermediates: >0 triangular over N frames, 0 bins, −1 equal counts.")
    ] = 1,
    skip_reconstruction: Annotated[bool, typer.Option(help="Only assign particles to frames/clusters.")] = False,
    export_frame_particles: Annotated[bool, typer.Option(help="intermediates: write each frame's particles.")] = False,
    subset_component: Annotated[
        int | None, typer.Option(help="intermediates: component whose frames are exported.")
    ] = None,
    cluster_method: Annotated[str, typer.Option(help="cluster: gmm (full covariance) or kmeans.")] = "gmm",
    seed: Annotated[int, typer.Option(help="Random seed of the clustering.")] = 0,
    downsample: Annotated[int | None, typer.Option(help="Fourier-crop the output volumes to this box.")] = None,
    crop: Annotated[int | None, typer.Option(help="Then keep the central BOX³ voxels.")] = None,
    filter_res: Annotated[float | None, typer.Option(help="Low-pass the output volumes (Å).")] = None,
    filter_order: Annotated[float, typer.Option(help="Butterworth order of the low-pass.")] = 1.5,
    highpass_res: Annotated[float | None, typer.Option(help="High-pass the output volumes (Å).")] = None,
    highpass_order: Annotated[float, typer.Option(help="Butterworth order of the high-pass.")] = 8.0,
    flip_hand: Annotated[bool, typer.Option(help="Mirror the output volumes (z → −z).")] = False,
    max_particles: Annotated[int | None, typer.Option(help="Use only the first N particles.")] = None,
    datadir: Annotated[Path | None, typer.Option(help="Folder the image paths are relative to.")] = None,
    scheduler: Scheduler = None,
    workers: Workers = None,
    gpus: Gpus = None,
    memory_limit: MemoryLimit = None,
    tls_ca_file: TlsCaFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """3D Variability Display: volume series, subset reconstructions and particle subsets."""
    from dva.display import job as display_job
    from dva.display.subsets import cluster_labels, equal_count_positions, frame_positions, frame_weights, one_hot
    from dva.display.volumes import VolumeOptions, check_options, output_pixel_size, prepare_volume
    from dva.io.results import read_results

    with _user_errors():
        if mode not in ("simple", "intermediates", "cluster"):
            raise DvaInputError(f"--mode {mode}: use simple, intermediates or cluster")
        if frames < 2:
            raise DvaInputError(f"--frames {frames}: need at least 2")
        if not 0 <= range_percentile < 50:
            raise DvaInputError(f"--range-percentile {range_percentile}: must be in [0, 50)")
        if window < -1:
            raise DvaInputError(f"--window {window}: use a number of frames > 0, 0 (bins) or −1 (equal counts)")
        if cluster_method not in ("gmm", "kmeans"):
            raise DvaInputError(f"--cluster-method {cluster_method}: use gmm or kmeans")
        run = read_results(results)
        picked = _component_list(components, run.z.shape[1])
        if subset_component is not None and subset_component not in picked:
            raise DvaInputError(f"--subset-component {subset_component}: not among the displayed components {picked}")
        n = min(len(run.z), max_particles or len(run.z))
        if max_particles is not None and max_particles < 1:
            raise DvaInputError(f"--max-particles {max_particles}: need at least 1")
        options = VolumeOptions(filter_res, filter_order, highpass_res, highpass_order, downsample, crop, flip_hand)
        box = run.mean.shape[-1]
        try:
            check_options(options, box, run.pixel_size_A)
        except ValueError as e:
            raise DvaInputError(str(e)) from None
        pixel = output_pixel_size(options, box, run.pixel_size_A)
        mean = prepare_volume(run.mean, run.pixel_size_A, options)
        level = display_job.contour_level(mean)
        z = run.z[:n]
        if mode == "simple":
            series = {
                k: display_job.linear_series(
                    mean,
                    prepare_volume(run.components[k], run.pixel_size_A, options),
                    frame_positions(z[:, k], frames, range_percentile),
                )
                for k in picked
            }
            with progress_bar("writing frames", frames * len(picked), quiet=quiet) as advance:
                display_job.write_series(out, run.prefix, series, pixel, level, advance)
            print(
                f"wrote {frames} frames per component ({', '.join(map(str, picked))}) in {out}/; in ChimeraX: open {out / (run.prefix + '_series.cxc')}"
            )
            return
        if mode == "intermediates":
            groups = {}
            for k in picked:
                positions = (
                    equal_count_positions(z[:, k], frames)
                    if window == -1
                    else frame_positions(z[:, k], frames, range_percentile)
                )
                groups[k] = frame_weights(z[:, k], positions, window)
        else:
            labels = cluster_labels(z[:, picked], frames, cluster_method, seed)
            groups = {"clusters": one_hot(labels, frames)}
        export = None  # cluster mode always writes its subsets; intermediates when asked
        if mode == "cluster":
            export = "clusters"
        elif export_frame_particles:
            export = picked[0] if subset_component is None else subset_component
        subsets = display_job.Subsets(mode, groups, options, pixel, level, export)
        source = run.job.get("input", "")
        if "://" not in source and not Path(source).exists():
            raise DvaInputError(
                f"{run.folder / 'job.json'}: field 'input' names {source}, which is missing (its particles are needed)"
            )
        out.mkdir(parents=True, exist_ok=True)
        datadir = datadir or (Path(run.job["datadir"]) if run.job.get("datadir") else None)
        passthrough = Path(run.job["passthrough"]) if run.job.get("passthrough") else None
        with _store_for(source, out, datadir, passthrough, n, quiet) as store:
            _, table, _ = open_store_table(store, n)
            cluster = (
                None
                if skip_reconstruction
                else _connect(scheduler, workers, gpus, memory_limit, tls_ca_file, tls_cert, tls_key)
            )
            try:
                if cluster is not None and not quiet:
                    print(f"dask dashboard: {cluster.client.dashboard_link}", file=sys.stderr)
                with progress_bar("reconstructing", len(groups), quiet=quiet or cluster is None) as advance:
                    written = display_job.write_subsets(run, out, store, table, subsets, cluster, advance)
            finally:
                if cluster is not None:
                    cluster.close()
        sizes = ", ".join(str(int((w > 0).sum())) for weights in groups.values() for w in weights.T)
        print(f"{mode}: particles per subset {sizes}; wrote {len(written)} files in {out}/")


@app.command()
def mask(
    volume: Annotated[Path, typer.Argument(help="Map to make the mask from (MRC).")],
    out: Annotated[Path, typer.Option("--out", help="Mask to write (MRC).")],
    threshold: Annotated[float, typer.Option(help="Density threshold of the map.")],
    dilate: Annotated[float, typer.Option(help="Widen the thresholded region by this much (Å).")] = 0.0,
    soft_edge: Annotated[float, typer.Option(help="Raised-cosine edge width (Å).")] = 0.0,
    exclude: Annotated[Path | None, typer.Option(help="Map of a region to leave out (e.g. a micelle).")] = None,
    exclude_threshold: Annotated[float, typer.Option(help="Threshold of the --exclude map.")] = 0.5,
) -> None:
    """Make a soft mask: threshold a map, dilate, soft edge; optionally cut out another map's region."""
    from dva.io.mrc import read_volume, write_volume
    from dva.ops.masks import soft_mask

    with _user_errors():
        if dilate < 0 or soft_edge < 0:
            raise DvaInputError(f"--dilate {dilate} / --soft-edge {soft_edge}: must be ≥ 0 Å")
        data, pixel = read_volume(volume)
        if pixel <= 0:
            raise DvaInputError(f"{volume}: header voxel size is {pixel}: a mask needs it to convert Å to pixels")
        if not data.max() > threshold:
            raise DvaInputError(f"{volume}: no voxel above --threshold {threshold} (max {data.max():.4g})")
        result = soft_mask(data, threshold, dilate_px=dilate / pixel, soft_px=soft_edge / pixel)
        if exclude is not None:
            other, other_pixel = read_volume(exclude)
            if other.shape != data.shape or abs(other_pixel - pixel) > 1e-3 * pixel:
                raise DvaInputError(
                    f"{exclude}: box {other.shape[0]} at {other_pixel:.4g} Å/px does not match {volume} "
                    f"(box {data.shape[0]} at {pixel:.4g} Å/px)"
                )
            cut = soft_mask(other, exclude_threshold, soft_px=soft_edge / pixel)
            result = result * (1.0 - cut)
        write_volume(out, result, pixel)
        print(f"wrote {out}: {float((result > 0.5).mean()):.2%} of the box inside (value > 0.5), {pixel:.4g} Å/px")


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="Output folder of dva run.")],
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the report (default RESULTS/report).")] = None,
) -> None:
    """Plots, a movie per component and one self-contained report.html (opens from disk, no network)."""
    from dva.io.results import read_results
    from dva.report.page import build_report

    with _user_errors():
        run = read_results(results)
        page = build_report(run, out or results / "report")
        print(f"report: {page}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")] = Path("dva-demo"),
    preset: Annotated[str, typer.Option(help="Simulation preset.")] = "small",
    box: Annotated[int | None, typer.Option(help="Fourier-crop for the run (default 48 for small).")] = None,
    iterations: Annotated[int, typer.Option(help="EM iterations.")] = 20,
    workers: Annotated[int | None, typer.Option(help="Workers of the embedded cluster.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """The whole job on the embedded cluster: simulate → import → run → what was found vs the truth."""
    from dva.engine.cluster import connect
    from dva.engine.loop import RunParams, run_3dva
    from dva.io.particles import read_particles
    from dva.io.store import import_particles, summary
    from dva.sim.score import score
    from dva.sim.simulate import PRESETS, simulate_dataset

    with _user_errors():
        if preset not in PRESETS:
            raise DvaInputError(f"--preset {preset}: use one of {', '.join(PRESETS)}")
        n = PRESETS[preset].particles
        with progress_bar("simulating", n, quiet=quiet) as advance:
            simulate_dataset(out / "sim", preset, progress=advance)
        store = out / "particles.zarr"
        table = read_particles(out / "sim" / "particles.star")
        with progress_bar("importing", n, quiet=quiet) as advance:
            import_particles(table, store, progress=advance)
        print(summary(store))
        run_box = box or (48 if preset == "small" else None)
        params = RunParams(filter_res_A=DEMO_FILTER_A, box=run_box, iterations=iterations)
        cluster = connect(workers=workers)
        try:
            if not quiet:
                print(f"dask dashboard: {cluster.client.dashboard_link}", file=sys.stderr)
            with _iteration_bar(iterations, quiet) as report:
                result = run_3dva(store, out / "sim" / "mask.mrc", params, cluster, progress=report)
        finally:
            cluster.close()
        job = {
            "input": str(store.absolute()),
            "mask": str((out / "sim" / "mask.mrc").absolute()),
            "backend": cluster.backend,
        }
        _, table, _ = open_store_table(store, result.particles)
        write_results(out / "run", "dva", result, table, job)
        found = score(result, out / "sim", DEMO_FILTER_A)
        print(
            f"ran 3DVA on {result.particles:,} particles at box {result.box} ({result.pixel_size_A:.3g} Å/px), "
            f"K=3, filter {DEMO_FILTER_A:g} Å, {iterations} iterations in {result.timings['total_s']:.0f} s"
        )
        per = ", ".join(f"{v:.2f}" for v in found["capture_per_component"])
        print(
            f"subspace capture of the {found['true_components']} true components with ≥5% of the variance: "
            f"{found['capture']:.2f} (per component {per})"
        )
        print(
            f"coordinate vs simulated motion: |Spearman(z0, latent)| = {found['spearman_z0_latent']:.2f}; "
            f"best |corr(z_k, subunit present)| = {found['best_correlation_state']:.2f}"
        )
        from dva.io.results import read_results
        from dva.report.page import build_report

        page = build_report(read_results(out / "run"), out / "run" / "report")
        print(f"results in {out / 'run'}")
        print(f"report: {page}")


DEMO_FILTER_A = 12.0
