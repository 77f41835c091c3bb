"""``wsi-ssl cluster-check``: one short batch job that reports what a worker sees."""

from __future__ import annotations

import argparse
import dataclasses
import json

from wsi_ssl.cli._embed import add_batch_arguments, cluster_spec

HELP = "submit one short batch job and report what its workers see (run this first on a cluster)"
DESCRIPTION = (
    "Submit one job with the same options `wsi-ssl embed --cluster ...` takes (GPUs, cores, "
    "memory, partition, account, --env-setup...), wait for its workers, and report what each one "
    "sees: host, GPUs (count and name) and its pinned CUDA_VISIBLE_DEVICES, CUDA and torch "
    "versions, free scratch space, the wsi-ssl version, and whether it sees --store and a sample "
    "of --slides at the same paths. The job is cancelled at the end. Exits 1 when something "
    "would stop a run (listed under PROBLEMS)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="a tile store path the workers must see")
    p.add_argument("--slides", nargs="*", default=(),
                   help="slide files, folders or globs (a sample of 64 is checked)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds to wait for the job to start (it may queue)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_batch_arguments(p, system_default="slurm")


def run(args: argparse.Namespace) -> int:

    from wsi_ssl.tiling import check_cluster  # lazy: dask; keeps wsi-ssl --help light

    spec = cluster_spec(args)
    if args.dry_run:
        print(spec.job_script("wsi-ssl-check"), end="")
        return 0
    rep = check_cluster(spec, store=args.store, slides=args.slides, timeout=args.timeout)
    if args.json:
        d = dataclasses.asdict(rep)
        d["ok"] = rep.ok
        print(json.dumps(d, indent=2, default=str))
        return 0 if rep.ok else 1
    print(f"system      {rep.system}; first worker after {rep.seconds_to_first_worker:.1f} s; "
          f"job {'cancelled' if rep.cancelled else 'NOT confirmed cancelled'}")
    for w in rep.workers:
        gpus = ", ".join(w.get("gpus") or []) or "none"
        print(f"worker      {w['host']}  CUDA_VISIBLE_DEVICES={w.get('cuda_visible_devices')}  "
              f"GPUs: {gpus}")
        print(f"            python {w.get('python')}, wsi-ssl {w.get('wsi_ssl')}, torch "
              f"{w.get('torch')}, CUDA {w.get('cuda')}")
        print(f"            scratch {w.get('scratch')}: {w.get('scratch_free_gb')} GB free")
        if args.store:
            print(f"            store visible: {w.get('store_visible')}")
        if w.get("slides_checked"):
            print(f"            slides visible: {w['slides_checked'] - len(w['slides_missing'])}"
                  f"/{w['slides_checked']} checked")
    if rep.problems:
        print("PROBLEMS")
        for line in rep.problems:
            print(f"  {line}")
        return 1
    print("ready       `wsi-ssl embed ... --cluster "
          f"{rep.system}` with the same options should run here")
    return 0
