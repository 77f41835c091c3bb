"""``wsi-ssl embed``: slides -> tile embeddings (+ the Giga-SSL view bank) in a zarr TileStore."""

from __future__ import annotations

import argparse

from wsi_ssl.cli._repair import with_repair_command

HELP = "embed the tissue tiles of slides into a resumable zarr tile store (dask-parallel)"
DESCRIPTION = (
    "Tile every slide at --mpp, embed the tiles with --encoder (a registered name, any timm "
    "architecture with --weights, or a .safetensors checkpoint of `wsi-ssl pretrain-tiles`), and "
    "optionally --views augmented versions of --view-tiles tiles each (the Giga-SSL bank used by "
    "`wsi-ssl pretrain-slides`). --mpp / --tile-size default to the encoder preset's. One task "
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="*", help="slide files, folders or glob patterns")
    p.add_argument("--store", required=True, help="output tile store (a .zarr folder)")
    p.add_argument("--encoder", required=True,
                   help="encoder name (see `wsi-ssl info --encoders`), timm name or checkpoint")
    p.add_argument("--weights", default=None, help="local weights (.safetensors or .pth)")
    p.add_argument("--manifest", default=None,
                   help="CSV with a 'path' column and optional 'slide_id', 'mpp' columns")
    p.add_argument("--mpp", type=float, default=None,
                   help="target resolution, µm/px (default: the encoder preset's, else 0.5)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile edge in pixels at --mpp (default: the encoder preset's, else 224)")
    p.add_argument("--min-tissue", type=float, default=0.25, help="min tissue fraction per tile")
    p.add_argument("--views", type=int, default=0,
                   help="augmented versions per slide (Giga-SSL bank; paper: 50; 0 = none)")
    p.add_argument("--view-tiles", type=int, default=256, help="tiles per augmented version")
    p.add_argument("--augment", default="histo", help="augmentation preset: histo or none")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per encoder call")
    p.add_argument("--assume-mpp", type=float, default=None,
                   help="µm/px for slides without MPP metadata (recorded as assumed)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage dtype of the features")
    p.add_argument("--device", default="auto", help="encoder device on each worker")
    p.add_argument("--scheduler", default=None,
                   help="dask scheduler address (tcp://host:port); default: a local cluster; "
                   "'sync' runs in this process")
    p.add_argument("--workers", type=int, default=None, help="local cluster worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the view sampling")
    p.add_argument("--overwrite", action="store_true", help="redo slides that are complete")
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing the store, wait for it instead of failing")
    add_batch_arguments(p)
    p.add_argument("--repair", action="store_true",
                   help="re-embed the slides whose chunks are missing or altered (see `wsi-ssl "
                   "info STORE --verify`), with the settings they were made with")


def run(args: argparse.Namespace) -> int:
    import logging

    from wsi_ssl.errors import ConfigError
    from wsi_ssl.tiling import embed_slides

    spec = cluster_spec(args)
    if args.dry_run:
        if spec is None:
            raise ConfigError("--dry-run prints the batch job script: give --cluster too.")
        from wsi_ssl.tiling import job_name_for

        print(spec.job_script(job_name_for(args.store)), end="")
        return 0
    if not args.slides and not args.manifest and not args.repair:
        raise ConfigError("give slide paths or --manifest CSV (or --repair).")
    if spec is not None:  # say what the jobs do: submitted, replaced, the live line
        for name in ("wsi_ssl.tiling._jobqueue", "wsi_ssl.tiling._embed"):
            logging.getLogger(name).setLevel(min(logging.INFO,
                                                 logging.getLogger(name).getEffectiveLevel()))
    if getattr(args, "verbose", 0) < 2:  # dask's own INFO chatter only with -vv
        for name in ("distributed", "distributed.scheduler", "distributed.nanny",
                     "distributed.core", "distributed.http.proxy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    report = with_repair_command(  # the damaged slides' command when the settings differ
        embed_slides,
        args.slides or None, args.encoder, args.store, weights=args.weights, mpp=args.mpp,
        tile_size=args.tile_size,
        views=args.views, view_tiles=args.view_tiles, augment=args.augment,
        batch_size=args.batch_size, min_tissue=args.min_tissue, seed=args.seed,
        assume_mpp=args.assume_mpp, manifest=args.manifest, dtype=args.dtype,
        device=args.device, client=args.scheduler, n_workers=args.workers, cluster=spec,
        overwrite=args.overwrite, wait=args.wait, repair=args.repair,
    )
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
    from wsi_ssl.errors import ConfigError

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
    from wsi_ssl.tiling import JobQueueSpec

    if isinstance(given["jobs"], str):
        raw = given["jobs"].strip()
        try:
            given["jobs"] = (tuple(int(x) for x in raw.split(":", 1)) if ":" in raw
                             else int(raw))
        except ValueError:
            raise ConfigError(f"--jobs {raw!r} must be a number or MIN:MAX.") from None
    return JobQueueSpec.from_env(args.cluster, **given)
