"""`lit-gen slurm`: a requeue-safe sbatch file for a recipe, launched the way Lightning's SLURM support expects.

What makes it requeue-safe (Lightning docs, "Run on an on-prem cluster (advanced)" / SLURM):
- one task per GPU (``--ntasks-per-node`` = ``--gpus-per-node``) started by ``srun``; Lightning's
  ``SLURMEnvironment`` reads the ranks, the master node and port from SLURM's variables, so no torchrun is needed;
- ``--signal=SIGUSR1@90``: SLURM warns every task 90 s before the time limit; Lightning's signal handler saves
  ``hpc_ckpt_<n>.ckpt`` in the run folder and requeues the job (``scontrol requeue``), ``--requeue`` allows it;
- ``--ckpt_path last``: the resumed job continues from the newest of ``checkpoints/last.ckpt`` and the HPC
  checkpoint (``callbacks.checkpoint.Checkpoint`` lists both as "last" candidates), and starts from scratch on the
  first launch;
- one log per job id (``%x-%j.out``, appended across requeues).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from lit_gen.errors import LitGenError


def recipe_root(configs: list[str], overrides: list[str]) -> str:
    """``trainer.default_root_dir`` as the recipes (last one wins) and ``--trainer.default_root_dir`` set it."""
    root = "runs/default"
    for config in configs:
        path = Path(config)
        if not path.is_file():
            raise LitGenError(f"recipe {config} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise LitGenError(f"recipe {config} is not valid YAML: {str(err).splitlines()[0]}") from None
        root = (data.get("trainer") or {}).get("default_root_dir") or root
    for i, item in enumerate(overrides):
        if item.startswith("--trainer.default_root_dir="):
            root = item.split("=", 1)[1]
        elif item == "--trainer.default_root_dir" and i + 1 < len(overrides):
            root = overrides[i + 1]
    return root


def sbatch_script(
    configs: list[str],
    nodes: int,
    gpus_per_node: int,
    *,
    time: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    job_name: str | None = None,
    cpus_per_task: int = 8,
    overrides: list[str] | None = None,
    workdir: str | Path | None = None,
    python: str | None = None,
) -> str:
    """The text of an sbatch file that runs ``lit-gen fit`` on ``nodes`` × ``gpus_per_node`` GPUs.

    Args:
        configs: recipe YAMLs, in ``-c`` order (later ones override earlier ones, as in ``lit-gen fit``).
        nodes: number of nodes (``trainer.num_nodes``).
        gpus_per_node: GPUs, and tasks, per node (``trainer.devices``).
        time: SLURM time limit per allocation (the job requeues itself until ``max_steps``).
        partition: SLURM partition, if the cluster needs one.
        account: SLURM account, if the cluster needs one.
        job_name: job name (default: the last recipe's ``<dataset>-<method>``).
        cpus_per_task: CPU cores per task (data loader workers need them).
        overrides: extra ``--key value`` arguments passed to ``lit-gen fit``.
        workdir: folder the job runs in (default: the current one); relative recipe and data paths resolve there.
        python: interpreter that has lit_gen installed (default: this one).
    """
    if nodes < 1 or gpus_per_node < 1:
        raise LitGenError(f"--nodes and --gpus-per-node must be at least 1, got {nodes} and {gpus_per_node}")
    if not configs:
        raise LitGenError("give at least one recipe with -c RECIPE.yaml")
    overrides = list(overrides or [])
    root = recipe_root(configs, overrides)
    name = job_name or "-".join(Path(configs[-1]).with_suffix("").parts[-2:])
    workdir = Path(workdir or Path.cwd()).resolve()
    python = python or sys.executable
    log_dir = Path(root) / "slurm"
    lines = [
        "#!/bin/bash",
        f"# Written by `lit-gen slurm` for {' '.join(configs)}. Submit with: sbatch THIS_FILE",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time}",
    ]
    lines += [f"#SBATCH --partition={partition}"] if partition else []
    lines += [f"#SBATCH --account={account}"] if account else []
    lines += [
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={log_dir}/%x-%j.out",
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        f"mkdir -p {shlex.quote(str(log_dir))}",
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK}",
        "",
    ]
    command = [python, "-m", "lit_gen.cli", "fit"]
    for config in configs:
        command += ["-c", config]
    command += [f"--trainer.num_nodes={nodes}", f"--trainer.devices={gpus_per_node}", *overrides]
    command += ["--ckpt_path", "last"]
    lines.append("srun --kill-on-bad-exit=1 " + " ".join(shlex.quote(part) for part in command))
    return "\n".join(lines) + "\n"
