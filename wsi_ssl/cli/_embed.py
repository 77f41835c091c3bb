"""``wsi-ssl embed``: slides -> tile embeddings (+ the Giga-SSL view bank) in a zarr TileStore."""

from __future__ import annotations

import argparse
import logging
import typing
from typing import Any

from wsi_ssl.cli._repair import with_repair_command
from wsi_ssl.errors import ConfigError
from wsi_ssl.tiling import PRESET_FIELDS, EmbedConfig, JobQueueSpec, job_name_for

HELP = "embed the tissue tiles of slides into a resumable zarr tile store (dask-parallel)"
DESCRIPTION = (
    "Tile every slide at --mpp, embed the tiles with --encoder (a registered name, any timm "
    "architecture with --weights, or a .safetensors checkpoint of `wsi-ssl pretrain-tiles`), and "
    "optionally --views augmented versions of --view-tiles tiles each (the Giga-SSL bank used by "
    "`wsi-ssl pretrain-slides`). --mpp / --tile-size default to the encoder preset's (as for "
    "`wsi-ssl tile --encoder`). An encoder without built-in weights (a timm name) needs "
    "--weights, or --random-weights on purpose. One task "
    "per slide: in this process when a cluster cannot pay off (one slide, one worker, one GPU), "
    "else on a local dask cluster (one worker per GPU) or --scheduler. "
    "Rerunning the same command skips complete slides and redoes interrupted ones. The run holds "
    "the store's writer lock: a second writer fails at once naming this one (or queues with "
    "--wait). --repair re-embeds the slides that `wsi-ssl info STORE --verify` finds damaged. "
    "--cluster slurm|pbs|lsf|sge runs the workers in batch jobs through dask-jobqueue (one "
    "worker per GPU, pinned; jobs cancelled when the command ends; see docs/cluster.md); every "
    "batch option defaults to WSI_SSL_<SYSTEM>_<OPTION> (e.g. WSI_SSL_SLURM_PARTITION), then to "
    "dask's jobqueue config (~/.config/dask/jobqueue.yaml). "
    "Exits 1 when any slide failed (the failures are recorded in the store)."
)


#: the EmbedConfig fields ``wsi-ssl embed`` takes as options (``--tile-size`` for
#: ``tile_size``), with their help; the defaults and types come from the EmbedConfig fields
EMBED_OPTIONS: tuple[tuple[str, str], ...] = (
    ("mpp", "target resolution of the tiles, µm/px (default: the encoder preset's, else "
            "{default})"),
    ("tile_size", "tile edge in pixels at --mpp (default: the encoder preset's, else "
                  "{default})"),
    ("overlap", "pixels shared by neighbouring tiles"),
    ("min_tissue", "min tissue fraction per tile"),
    ("views", "augmented versions per slide (Giga-SSL bank; paper: 50; 0 = none)"),
    ("view_tiles", "tiles per augmented version"),
    ("augment", "augmentation preset: histo or none"),
    ("batch_size", "tiles per encoder call"),
    ("assume_mpp", "the slide's own µm/px for slides without MPP metadata (recorded as "
                   "assumed)"),
    ("dtype", "storage dtype of the features"),
    ("device", "encoder device on each worker"),
    ("seed", "seed of the view sampling"),
    ("backend", "slide reader backend"),
    ("read_threads", "tile-reading threads per slide (default: chosen per slide)"),
    ("prefetch", "tile batches read ahead of the encoder"),
)
#: choices of string settings (not defaults)
_CHOICES = {"backend": ("auto", "tiffslide", "openslide", "tiatoolbox")}


def config_option(name: str) -> str:
    """The command-line flag of the EmbedConfig field ``name`` (``--tile-size``)."""
    return "--" + name.replace("_", "-")


def add_config_options(p: argparse.ArgumentParser, options: tuple[tuple[str, str], ...]
                       ) -> None:
    """One option per ``(field, help)``: default and type from the EmbedConfig field
    (``mpp`` / ``tile_size`` default to ``None``: the encoder preset's, else the field's)."""
    hints = typing.get_type_hints(EmbedConfig)
    for name, help_text in options:
        default = EmbedConfig.default(name)
        hint = hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kw: dict[str, Any] = {"default": None if name in PRESET_FIELDS else default,
                              "help": help_text.format(default=default), "dest": name}
        if name in PRESET_FIELDS:  # the help says the default: no "(default: None)" after it
            kw["help"] += "%(default).0s"
        if typing.get_origin(hint) is typing.Literal:
            kw["choices"] = typing.get_args(hint)
        elif hint in (int, float):
            kw["type"] = hint
        elif args and args[0] in (int, float):  # int | None, float | None
            kw["type"] = args[0]
        if name in _CHOICES:
            kw["choices"] = _CHOICES[name]
        p.add_argument(config_option(name), **kw)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The EmbedConfig fields given as options (``mpp`` / ``tile_size`` left out when not
    given: the encoder preset's)."""
    out = {f: getattr(args, f) for f in EmbedConfig.__dataclass_fields__ if hasattr(args, f)}
    return {k: v for k, v in out.items() if not (k in PRESET_FIELDS and v is None)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="*", help="slide files, folders or glob patterns")
    p.add_argument("--store", required=True, help="output tile store (a .zarr folder)")
    p.add_argument("--encoder", required=True,
                   help="encoder name (see `wsi-ssl info --encoders`), timm name or checkpoint")
    p.add_argument("--weights", default=None,
                   help="local weights (.safetensors or .pth; for a preset also the folder of "
                   "its hub files)")
    p.add_argument("--random-weights", action="store_true",
                   help="embed with a random initialisation on purpose (tests, demos; the "
                   "features carry no pretrained meaning); recorded in the store")
    p.add_argument("--manifest", default=None,
                   help="CSV with a 'path' column and optional 'slide_id', 'slide_mpp' columns")
    add_config_options(p, EMBED_OPTIONS)
    p.add_argument("--scheduler", default=None,
                   help="dask scheduler address (tcp://host:port); default: a local cluster; "
                   "'sync' runs in this process")
    p.add_argument("--workers", type=int, default=None, help="local cluster worker processes")
    p.add_argument("--overwrite", action="store_true", help="redo slides that are complete")
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing the store, wait for it instead of failing")
    add_batch_arguments(p)
    p.add_argument("--repair", action="store_true",
                   help="re-embed the slides whose chunks are missing or altered (see `wsi-ssl "
                   "info STORE --verify`), with the settings they were made with")


def check_weights(encoder: str, weights: Any, random_weights: bool) -> None:
    """Refuse an encoder without built-in weights given neither weights nor
    ``--random-weights`` (it would embed noise silently)."""
    from wsi_ssl.encoders import has_builtin_weights  # lazy: wsi_ssl.encoders imports torch

    if random_weights and weights is not None:
        raise ConfigError("give --weights FILE or --random-weights, not both.")
    if weights is None and not random_weights and not has_builtin_weights(encoder):
        raise ConfigError(
            f"encoder {encoder!r} has no built-in weights: give --weights FILE (a .safetensors "
            "or .pth state dict), or --random-weights to embed with a random initialisation on "
            "purpose (the features then carry no pretrained meaning).")


def _quiet_logs(args: argparse.Namespace, batch: bool) -> None:
    if batch:  # say what the jobs do: submitted, replaced, the live line
        for name in ("wsi_ssl.tiling._jobqueue", "wsi_ssl.tiling._embed"):
            logging.getLogger(name).setLevel(min(logging.INFO,
                                                 logging.getLogger(name).getEffectiveLevel()))
    if getattr(args, "verbose", 0) < 2:  # dask's own INFO chatter only with -vv
        for name in ("distributed", "distributed.scheduler", "distributed.nanny",
                     "distributed.core", "distributed.http.proxy"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _print_report(report: Any) -> int:
    print(f"store     {report.store}")
    print(f"embedded  {len(report.done)} slides, {report.n_tiles} tiles + "
          f"{report.n_view_tiles} view tiles in {report.seconds:.1f} s "
          f"({report.tiles_per_second:.0f} tiles/s)")
    print(f"skipped   {len(report.skipped)} slides already complete")
    if report.plan:
        print(f"ran       {report.plan}")
    if report.failed:
        print(f"FAILED    {len(report.failed)} slides:")
        for sid, path, err in report.failed:
            print(f"  {sid:<30} {path}\n    {err}")
        print("fix them (e.g. --assume-mpp for slides without MPP) and rerun the same command.")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.tiling import embed_slides  # lazy: pulls in torch (`--help` stays fast)

    spec = cluster_spec(args)
    if args.dry_run:
        if spec is None:
            raise ConfigError("--dry-run prints the batch job script: give --cluster too.")
        print(spec.job_script(job_name_for(args.store)), end="")
        return 0
    if not args.slides and not args.manifest and not args.repair:
        raise ConfigError("give slide paths or --manifest CSV (or --repair).")
    check_weights(args.encoder, args.weights, args.random_weights)
    _quiet_logs(args, spec is not None)
    report = with_repair_command(  # the damaged slides' command when the settings differ
        embed_slides,
        args.slides or None, args.encoder, args.store, weights=args.weights,
        random_weights=args.random_weights, manifest=args.manifest, client=args.scheduler,
        n_workers=args.workers, cluster=spec, overwrite=args.overwrite, wait=args.wait,
        repair=args.repair, **config_overrides(args))
    return _print_report(report)


def add_batch_arguments(p: argparse.ArgumentParser, *, system_default: str | None = None
                        ) -> None:
    """The batch-cluster options (shared by ``embed`` and ``cluster-check``)."""
    b = p.add_argument_group(
        "batch cluster (dask-jobqueue)",
        "unset options come from WSI_SSL_<SYSTEM>_<OPTION> variables, then from dask's "
        "jobqueue.<system>.* config")
    b.add_argument("--cluster", choices=("slurm", "pbs", "lsf", "sge"), default=system_default,
                   help="run the workers in jobs of this batch system (pip install "
                   "'wsi-ssl[hpc]')")
    b.add_argument("--jobs", default=None,
                   help="number of jobs, or MIN:MAX to scale adaptively (default 1)")
    b.add_argument("--gpus-per-job", type=int, default=None,
                   help="GPUs per job; one pinned dask worker per GPU (default 0: one CPU "
                   "worker per job)")
    b.add_argument("--cores", type=int, default=None, help="CPU cores per job")
    b.add_argument("--memory", default=None, help="memory per job, e.g. 64GB")
    b.add_argument("--partition", default=None, help="partition / queue")
    b.add_argument("--account", default=None, help="account (Slurm, PBS) or project (LSF, SGE)")
    b.add_argument("--walltime", default=None, help="per job, HH:MM:SS")
    b.add_argument("--job-extra", action="append", default=None,
                   help="a raw directive line, e.g. --job-extra='--constraint=a100' "
                   "(repeatable)")
    b.add_argument("--env-setup", action="append", default=None,
                   help="a shell line run in the job before the worker, e.g. "
                   "--env-setup='module load cuda' (repeatable)")
    b.add_argument("--local-directory", default=None,
                   help="the workers' node-local scratch folder (e.g. '$TMPDIR')")
    b.add_argument("--log-directory", default=None, help="where the jobs write their output")
    b.add_argument("--max-retries", type=int, default=None,
                   help="a slide whose worker dies is retried this many times, then recorded "
                   "as failed (default 2)")
    b.add_argument("--dry-run", action="store_true",
                   help="print the job script that would be submitted and exit")


def cluster_spec(args: argparse.Namespace):
    """The JobQueueSpec of --cluster and the batch options (None without --cluster)."""
    given = {"jobs": args.jobs, "gpus_per_job": args.gpus_per_job, "cores": args.cores,
             "memory": args.memory, "partition": args.partition, "account": args.account,
             "walltime": args.walltime, "job_extra": tuple(args.job_extra or ()),
             "env_setup": tuple(args.env_setup or ()), "local_directory": args.local_directory,
             "log_directory": args.log_directory, "max_retries": args.max_retries}
    if args.cluster is None:
        used = [k for k, v in given.items() if v not in (None, ())]
        if used:
            raise ConfigError(f"--{used[0].replace('_', '-')} is a batch-cluster option: give "
                              "--cluster slurm (or pbs, lsf, sge) too.")
        return None
    if getattr(args, "scheduler", None) is not None or getattr(args, "workers", None) is not None:
        raise ConfigError("--cluster starts its own workers in batch jobs; drop --scheduler / "
                          "--workers.")

    if isinstance(given["jobs"], str):
        raw = given["jobs"].strip()
        try:
            given["jobs"] = (tuple(int(x) for x in raw.split(":", 1)) if ":" in raw
                             else int(raw))
        except ValueError:
            raise ConfigError(f"--jobs {raw!r} must be a number or MIN:MAX.") from None
    return JobQueueSpec.from_env(args.cluster, **given)
