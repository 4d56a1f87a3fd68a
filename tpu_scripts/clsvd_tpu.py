#!/usr/bin/env python3
"""Run clsvd_jax on a Cloud TPU VM or pod slice: create, install, launch, stream logs, fetch results, delete.

Every subcommand takes ``--dry-run``: it prints each command (gcloud and local) instead of running it, one per line,
so a job can be reviewed, or pasted into another shell, before anything is billed. Settings come from flags, or
from the environment (``CLSVD_TPU_NAME``, ``CLSVD_TPU_ZONE``, ``CLSVD_TPU_PROJECT``, ``CLSVD_TPU_TYPE``,
``CLSVD_TPU_VERSION``, ``CLSVD_TPU_BUCKET``). Only the standard library is used: it runs from any machine with
the gcloud CLI.

    python3 tpu_scripts/clsvd_tpu.py run --name clsvd-t5 --zone us-central2-b --project my-proj \\
        --accelerator-type v4-32 --bucket gs://my-bucket --config configs/t5_large/order1.yaml --dry-run
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = "~/clsvd-venv"
REMOTE_SRC = "~/clsvd_jax"
LOG = "~/clsvd_run.log"

# Runtime (VM image) per TPU generation, from the Cloud TPU docs' "TPU software versions".
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
            "v6e": "v2-alpha-tpuv6e"}


class Shell:
  """Runs commands, or prints them under --dry-run."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def __call__(self, cmd: list[str], check: bool = True) -> int:
    line = shlex.join(cmd)
    if self.dry_run:
      print(line)
      return 0
    print(f"+ {line}", file=sys.stderr, flush=True)
    rc = subprocess.call(cmd)
    if check and rc != 0:
      raise SystemExit(f"command failed with exit status {rc}: {line}")
    return rc


def default_runtime(accelerator_type: str) -> str:
  gen = accelerator_type.split("-")[0].lower()
  if gen not in RUNTIMES:
    raise SystemExit(f"--accelerator-type {accelerator_type!r}: unknown TPU generation {gen!r}; pass --version "
                     f"explicitly (known: {', '.join(RUNTIMES)})")
  return RUNTIMES[gen]


def _loc(a: argparse.Namespace) -> list[str]:
  out = [f"--zone={a.zone}"]
  if a.project:
    out.append(f"--project={a.project}")
  return out


def _tpu(a: argparse.Namespace, verb: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, *_loc(a)]


def _ssh(a: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
  return _tpu(a, "ssh", a.name, f"--worker={worker}", f"--command={command}")


def _run_dir(a: argparse.Namespace) -> str:
  """The run directory on the workers, relative to the home directory (ssh and scp start there)."""
  return f"runs/{a.run_name}"


def cmd_create(a: argparse.Namespace, sh: Shell) -> None:
  cmd = _tpu(a, "create", a.name, f"--accelerator-type={a.accelerator_type}",
             f"--version={a.version or default_runtime(a.accelerator_type)}")
  if a.spot:
    cmd.append("--spot")
  sh(cmd)


def install_script(gcs: bool = False) -> str:
  """What every worker runs to install the project (and JAX for TPU) into a virtualenv; ``gcs``: with the ``gcs``
  extra (gcsfs: the runner reads and writes a ``gs://`` run_dir through it)."""
  # The quotes keep the shell from globbing the brackets; the tilde before them still expands.
  project = f"{REMOTE_SRC}'[gcs]'" if gcs else REMOTE_SRC
  return " && ".join([
      f"rm -rf {REMOTE_SRC} && mkdir -p {REMOTE_SRC}",
      f"tar -xzf ~/clsvd_jax.tar.gz -C {REMOTE_SRC}",
      f"python3 -m venv {VENV}",
      f"{VENV}/bin/pip install -q -U pip",
      f"{VENV}/bin/pip install -q -U 'jax[tpu]'",
      f"{VENV}/bin/pip install -q -e {project}",
      f"{VENV}/bin/python -c 'import jax, clsvd_jax; print(jax.process_index(), jax.device_count())'",
  ])


def cmd_install(a: argparse.Namespace, sh: Shell) -> None:
  tarball = f"/tmp/clsvd_jax-{a.name}.tar.gz"
  # The committed tree (git archive), so every worker runs exactly one known revision.
  sh(["git", "-C", str(a.repo), "archive", "--format=tar.gz", "-o", tarball, a.ref])
  sh(_tpu(a, "scp", tarball, f"{a.name}:clsvd_jax.tar.gz", "--worker=all"))
  sh(_ssh(a, install_script(gcs=bool(a.bucket))))


# The runner's config key for its output folder (results, plots, logs and Orbax checkpoints).
RUN_DIR_KEY = "run_dir"


def remote_run_dir(a: argparse.Namespace) -> str:
  """Where the run writes: the bucket when given (Orbax needs one directory that every host of a pod writes to),
  else the home directory of each worker (fine on a single-host VM)."""
  if a.bucket:
    return f"{a.bucket.rstrip('/')}/{a.run_name}"
  return f"$HOME/{_run_dir(a)}"


def train_command(a: argparse.Namespace) -> str:
  """The worker-side command line of one run: the same on every host (JAX's multi-controller model)."""
  args = [f"{VENV}/bin/clsvd", "train", shlex.quote(a.config), "--set", f"{RUN_DIR_KEY}={remote_run_dir(a)}"]
  for kv in a.set or []:
    args += ["--set", shlex.quote(kv)]
  if a.resume:
    args.append("--resume")
  env = " ".join(["CLSVD_DISTRIBUTED=1", a.env]).strip()
  mkdir = "" if a.bucket else f"mkdir -p {_run_dir(a)} && "
  return f"{mkdir}cd {REMOTE_SRC} && {env} {' '.join(args)}"


def cmd_launch(a: argparse.Namespace, sh: Shell) -> None:
  cmd = train_command(a)
  if a.wait:
    # Attached: the ssh session streams every worker's output (prefixed by gcloud) until the run ends.
    sh(_ssh(a, f"set -o pipefail; ( {cmd} ) 2>&1 | tee {LOG}"))
  else:
    sh(_ssh(a, f"nohup bash -c {shlex.quote(cmd)} > {LOG} 2>&1 < /dev/null &"))


def cmd_selfcheck(a: argparse.Namespace, sh: Shell) -> None:
  sh(_ssh(a, f"cd {REMOTE_SRC} && CLSVD_DISTRIBUTED=1 {VENV}/bin/python -m clsvd_jax.parallel.selfcheck "
             f"--mesh {shlex.quote(a.mesh)}"))


def cmd_logs(a: argparse.Namespace, sh: Shell) -> None:
  sh(_ssh(a, f"tail -n +1 -f {LOG}", worker=a.worker))


def cmd_fetch(a: argparse.Namespace, sh: Shell) -> None:
  """Copies the run directory (results.json, R.csv, plots, logs) to DEST/RUN."""
  sh(["mkdir", "-p", a.dest])
  if a.bucket:
    sh(["gcloud", "storage", "cp", "-r", f"{a.bucket.rstrip('/')}/{a.run_name}", a.dest])
  else:
    # Process 0, on worker 0, writes the results.
    sh(_tpu(a, "scp", "--recurse", f"{a.name}:{_run_dir(a)}", a.dest, "--worker=0"))


def cmd_delete(a: argparse.Namespace, sh: Shell) -> None:
  sh(_tpu(a, "delete", a.name, "--quiet"))


def cmd_status(a: argparse.Namespace, sh: Shell) -> None:
  sh(_tpu(a, "describe", a.name))


def cmd_run(a: argparse.Namespace, sh: Shell) -> None:
  """Everything, in order; the slice is deleted at the end (also after a failure) unless --keep."""
  cmd_create(a, sh)
  try:
    cmd_install(a, sh)
    if a.selfcheck:
      cmd_selfcheck(a, sh)
    a.wait = True
    cmd_launch(a, sh)
    cmd_fetch(a, sh)
  finally:
    if not a.keep:
      cmd_delete(a, sh)


def build_parser() -> argparse.ArgumentParser:
  env = os.environ.get
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", default=env("CLSVD_TPU_NAME"), help="TPU VM / slice name")
  common.add_argument("--zone", default=env("CLSVD_TPU_ZONE"), help="e.g. us-central2-b")
  common.add_argument("--project", default=env("CLSVD_TPU_PROJECT"), help="GCP project (default: gcloud config)")
  common.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
  common.add_argument("--bucket", default=env("CLSVD_TPU_BUCKET"),
                      help="gs://bucket: the run writes results and checkpoints to BUCKET/RUN (needed on multi-host "
                      "slices: every host writes its checkpoint shards there)")
  common.add_argument("--run-name", default="run", help="run directory name (BUCKET/NAME, else ~/runs/NAME on "
                      "the workers; DEST/NAME here)")

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)

  def add(name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=help_text)

  def slice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accelerator-type", default=env("CLSVD_TPU_TYPE"), help="e.g. v4-32, v5p-64, v5litepod-32")
    p.add_argument("--version", default=env("CLSVD_TPU_VERSION"), help="TPU runtime (default by generation)")
    p.add_argument("--spot", action="store_true", help="spot capacity (cheaper, may be preempted)")

  def install_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", default=str(REPO), help="the local clsvd_jax checkout to install")
    p.add_argument("--ref", default="HEAD", help="git revision to install")

  def launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config, relative to the repo (or absolute on the workers)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--env", default="", help="extra environment for the run, e.g. 'XLA_FLAGS=...'")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in the run directory")

  def fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", default="results", help="local directory for the results")

  slice_args(add("create", "create the TPU VM / pod slice"))
  install_args(add("install", "copy the project to every worker and install it with jax[tpu]"))
  p = add("launch", "start a config on all workers")
  launch_args(p)
  p.add_argument("--wait", action="store_true", help="stay attached and stream output until the run ends")
  p = add("selfcheck", "run the sharding self-check on all workers (a few seconds, before a long job)")
  p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
  p = add("logs", "stream the run log of a worker")
  p.add_argument("--worker", default="0", help="worker index or 'all'")
  fetch_args(add("fetch", "copy results back (from the bucket when given, else from worker 0)"))
  add("delete", "delete the TPU VM / slice")
  add("status", "describe the TPU VM / slice")
  p = add("run", "create, install, launch (attached), fetch, delete")
  slice_args(p)
  install_args(p)
  launch_args(p)
  fetch_args(p)
  p.add_argument("--keep", action="store_true", help="keep the slice after the run")
  p.add_argument("--selfcheck", action="store_true", help="run the sharding self-check before the job")
  p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="mesh of the self-check")
  return ap


COMMANDS = {"create": cmd_create, "install": cmd_install, "launch": cmd_launch, "selfcheck": cmd_selfcheck,
            "logs": cmd_logs, "fetch": cmd_fetch, "delete": cmd_delete, "status": cmd_status, "run": cmd_run}


def main(argv: list[str] | None = None) -> int:
  a = build_parser().parse_args(argv)
  missing = [flag for flag, value in (("--name", a.name), ("--zone", a.zone)) if not value]
  if getattr(a, "accelerator_type", "x") is None:
    missing.append("--accelerator-type")
  if missing:
    raise SystemExit(f"{a.cmd}: missing {', '.join(missing)} (flags, or CLSVD_TPU_* environment variables)")
  if a.bucket and not re.fullmatch(r"gs://[a-z0-9][a-z0-9._-]*(/[A-Za-z0-9._/-]*)?", a.bucket):
    raise SystemExit(f"--bucket {a.bucket!r} must be a gs:// URL (letters, digits, . _ - /)")
  if not re.fullmatch(r"[A-Za-z0-9._-]+", a.run_name):
    raise SystemExit(f"--run-name {a.run_name!r}: use letters, digits, '.', '_' or '-'")
  COMMANDS[a.cmd](a, Shell(a.dry_run))
  return 0


if __name__ == "__main__":
  sys.exit(main())
