"""The ``lit-gen`` command.

    lit-gen fit|validate|test -c RECIPE.yaml [-c OVERLAY.yaml ...] [--section.key value ...] [--ckpt_path last]
    lit-gen shards SRC --out DIR [--shard-size N] [--image-size S] [--seed S] [--val-fraction F] [--workers W]
    lit-gen sample --ckpt PATH --n N [--steps K] [--sampler NAME] [--seed S] [--label L] [--guidance G] --out F
    lit-gen export --ckpt PATH --out FILE.safetensors [--weights ema|raw] [--keep-adapters]
    lit-gen eval --ckpt PATH --ref SHARDS [--metric fd|mixture|...] [--steps K ...] [--n N] [--json]
    lit-gen slurm -c RECIPE.yaml [-c OVERLAY.yaml] --nodes N --gpus-per-node G [--time ...] [-- --key value ...]
    lit-gen import SRC --out TEACHER.safetensors [--format auto|diffusers|edm|edm2|dit] [--check]
    lit-gen quickstart [--out DIR] [--tiny] [--jobs N]
    lit-gen pipeline -c PIPELINE.yaml [--out DIR] [--tiny] [--jobs N]
    lit-gen report RUN_OR_PIPELINE_DIR [--out report.html]

Training verbs are LightningCLI (recipes are its YAML); the plain tools are argparse. ``-v``/``--verbose`` (or
``LIT_GEN_VERBOSE=1``) on any verb shows the library messages lit_gen filters as expected (``lit_gen/console.py``).
Every user-fixable problem is a ``LitGenError`` and is printed as one line (``lit-gen: error: ...``), exit status 2,
no traceback.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lit_gen.errors import LitGenError, find_user_error, first_line

TRAIN_VERBS = ("fit", "validate", "test")
ALWAYS_ON_CALLBACKS = {
    "callbacks.nonfinite.NonFiniteGuard": {"policy": "stop"},
    "callbacks.preemption.Preemption": {"requeue": True},
    "callbacks.rng_state.RNGState": {},
    "callbacks.progress.Throughput": {},  # samples/s in TensorBoard and on the progress bar
    "callbacks.health.TrainingHealth": {},  # warns once when logged signals cross thresholds (no-op without them)
}
DEFAULT_ROOT = "runs/default"


def lightning_cli(args: list[str], run: bool = True, instantiate: bool = True) -> Any:
    """LightningCLI with lit_gen's defaults: checkpoints in ``<default_root_dir>/checkpoints`` (``last.ckpt``
    kept) and TensorBoard logs in ``<default_root_dir>/tb``. ``run=False`` (args without the verb) only parses
    and instantiates — what the recipe tests use; ``instantiate=False`` as well only parses and validates the
    recipe (``cli.config``), for recipes too big to build on the machine at hand."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class LitGenCLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
            trainer = config.trainer
            root = trainer.default_root_dir or DEFAULT_ROOT
            trainer.default_root_dir = root
            _check_strategy(trainer)
            for callback in trainer.callbacks or []:
                if (
                    str(callback.class_path).endswith(("ModelCheckpoint", "callbacks.checkpoint.Checkpoint"))
                    and callback.init_args.get("dirpath") is None
                ):
                    callback.init_args.dirpath = str(Path(root) / "checkpoints")
            names = [str(getattr(callback, "class_path", "")) for callback in trainer.callbacks or []]
            if self.config.get("subcommand") == "fit":
                from jsonargparse import Namespace

                # Always on; list one in a recipe to configure it.
                for path, init_args in ALWAYS_ON_CALLBACKS.items():
                    if not any(n.endswith(path.rpartition(".")[2]) for n in names):
                        callback = Namespace(class_path=path, init_args=Namespace(**init_args))
                        trainer.callbacks = [*(trainer.callbacks or []), callback]
                if trainer.enable_progress_bar is not False and not any(n.endswith("ProgressBar") for n in names):
                    # step / max_steps, loss, samples/s, time left (Lightning's default counts epochs: "Epoch 4/-2")
                    callback = Namespace(class_path="callbacks.progress.StepProgressBar", init_args=Namespace())
                    trainer.callbacks = [*(trainer.callbacks or []), callback]
            if trainer.logger in (None, True):
                from jsonargparse import Namespace

                trainer.logger = Namespace(
                    class_path="lightning.pytorch.loggers.TensorBoardLogger",
                    init_args=Namespace(save_dir=root, name="tb", version=""),
                )

        def instantiate_classes(self) -> None:
            if instantiate:
                super().instantiate_classes()

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads a --ckpt_path file for its hyperparameters right after parsing: check it first
            # ("last" needs the trainer's checkpoint folders; it is checked in the before_* hooks below).
            if self.config.get("subcommand"):
                check_resume_checkpoint(None, self.config[self.config.subcommand].get("ckpt_path"))
            super()._parse_ckpt_path()

        def _check_last(self) -> None:
            subcommand = self.config.subcommand
            if self.config[subcommand].get("ckpt_path") == "last":
                if check_resume_checkpoint(self.trainer, "last") is None:
                    # A fresh run: start from scratch without Lightning's "no last checkpoint available" warning.
                    self.config_init[subcommand]["ckpt_path"] = None

        def before_fit(self) -> None:
            # A global batch that does not divide across devices fails here, before any process is launched.
            resolve = getattr(self.datamodule, "resolve_batch_size", None)
            if resolve is not None:
                resolve(self.trainer.world_size, self.trainer.accumulate_grad_batches)
            self._check_last()

        before_validate = before_test = _check_last

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return LitGenCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},  # recipe errors come back to main() as one line
        args=args,
        run=run,
    )


def _check_strategy(trainer: Any) -> None:
    """A strategy class given by ``class_path`` may check the trainer section before anything is built
    (``check_trainer_config``, e.g. lit_gen.scale.fsdp.FSDP refuses a precision it cannot run)."""
    path = getattr(trainer.strategy, "class_path", None) if trainer.strategy is not None else None
    if not isinstance(path, str) or not path.startswith("lit_gen."):
        return
    import importlib

    module_name, _, name = path.rpartition(".")
    check = getattr(getattr(importlib.import_module(module_name), name, None), "check_trainer_config", None)
    if check is not None:
        check(trainer)


def check_resume_checkpoint(trainer: Any, ckpt_path: Any) -> Path | None:
    """Refuse an unreadable ``--ckpt_path`` file with one line before Lightning loads it (whose own load would end
    in a traceback from deep inside torch's unpickler on damaged bytes); ``trainer`` None: before the trainer exists.
    ``last`` is resolved as Lightning does: the newest ``last*.ckpt`` of the checkpoint callbacks. Folders (DeepSpeed
    checkpoints) are checked by ``lit_gen_deepspeed``,
    FSDP folders by ``lit_gen.scale.fsdp.FSDP``. The load is memory-mapped: its tensors are not read."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_gen.errors import load_torch_file

    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path == "last":
        if trainer is None:
            return None  # resolved once the trainer (and its checkpoint callbacks) exist
        found = [
            path
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir()
            for path in Path(callback.dirpath).glob("last*.ckpt")
        ]
        if not found:
            return None  # nothing to resume: the first launch of a requeue-safe job starts from scratch
        path = max(found, key=lambda p: p.stat().st_mtime)
    else:
        path = Path(ckpt_path)
        if not path.exists():
            raise LitGenError(f"--ckpt_path {path} does not exist")
    if path.is_dir():
        return path
    if not zipfile.is_zipfile(path):  # what torch.save (and so Lightning) writes; mmap needs it
        raise LitGenError(f"cannot read checkpoint {path}: not a torch checkpoint archive (truncated or another file?)")
    checkpoint = load_torch_file(path, f"checkpoint {path}", mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise LitGenError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return path


_NOISE = ("Given value", "Subtypes:", "Errors:", "Does not validate against any", "Expected a <class 'NoneType'>")


def condense(message: str) -> str:
    """One line out of jsonargparse's nested multi-line validation message (the specific parts kept)."""
    parts = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    parts = [p for p in parts if p and not any(line_start in p for line_start in _NOISE)]
    return " ".join(parts) or message.strip()


# ----------------------------------------------------------------------------------------------------- plain tools
def _cmd_shards(ns: argparse.Namespace) -> None:
    from lit_gen.data.shards import write_shards

    start = time.time()
    command = "lit-gen shards " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None
    info = write_shards(
        ns.src,
        ns.out,
        shard_size=ns.shard_size,
        image_size=ns.image_size,
        seed=ns.seed,
        command=command,
        val_fraction=ns.val_fraction,
        workers=ns.workers,
        progress=not ns.no_progress,
        encode=ns.encode,
        encode_mode=ns.encode_mode,
        device=ns.device,
    )
    where = f"{ns.out}/train" if ns.val_fraction > 0 else ns.out
    print(
        f"wrote {info['num_samples']} {info['kind']} samples of shape {info['shape']} "
        f"({info['num_classes']} classes) in {len(info['shards'])} shard(s) to {where} in {time.time() - start:.1f}s"
    )
    if ns.val_fraction > 0:
        from lit_gen.data.info import read_info

        val = read_info(Path(ns.out) / "val")
        print(f"wrote {val['num_samples']} validation samples in {len(val['shards'])} shard(s) to {ns.out}/val")


def _cmd_sample(ns: argparse.Namespace) -> None:
    import torch

    from lit_gen.export import load_model, usable_device
    from lit_gen.viz import samples_picture, save_png

    out = Path(ns.out)
    if out.suffix not in (".png", ".npy"):
        raise LitGenError(f"--out must end in .png or .npy, got {out}")
    usable_device(ns.device)
    model = load_model(ns.ckpt, weights=ns.weights)
    start = time.time()
    samples = model.sample(
        ns.n,
        steps=ns.steps,
        sampler=ns.sampler,
        seed=ns.seed,
        label=ns.label,
        guidance=ns.guidance,
        device=ns.device,
        allow_extrapolation=ns.allow_extrapolation,
    )
    kind = model.data_info["kind"]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        array = samples.round().clamp(0, 255).to(torch.uint8) if kind in ("image", "latent") else samples
        np.save(out, array.numpy())
    else:
        save_png(samples_picture(samples, kind), out)
    print(f"wrote {ns.n} samples to {out} in {time.time() - start:.1f}s")


def _cmd_export(ns: argparse.Namespace) -> None:
    from lit_gen.export import export

    path = export(ns.ckpt, ns.out, weights=ns.weights, guide=ns.guide, keep_adapters=ns.keep_adapters)
    carried = f" with its guiding model {ns.guide}" if ns.guide else ""
    print(f"exported {ns.weights} weights of {ns.ckpt}{carried} to {path}")


def _cmd_phema(ns: argparse.Namespace) -> None:
    """Post-hoc EMA (EDM2): one model file per σ_rel, and with --ref a sweep that names the best one."""
    from lit_gen.phema import run_phema

    written = run_phema(ns.run_dir, ns.sigma_rel, ns.out, ckpt=ns.ckpt, at_step=ns.at_step)
    for sigma_rel, path in written:
        print(f"sigma_rel {sigma_rel:g}: wrote {path}")
    if ns.ref is None:
        return
    from lit_gen.eval.runner import Evaluator, format_table

    evaluator = Evaluator(ns.ref, ns.metric, device=ns.device, seed=ns.seed)
    rows = []
    for sigma_rel, path in written:
        for row in evaluator.evaluate(path, steps=ns.steps, n=ns.n, seed=ns.seed, name=f"phema {sigma_rel:g}"):
            rows.append({"sigma_rel": sigma_rel, **row})
    print(format_table(rows))
    key = next((m for m in ("fd", "fd_digits", "fd_raw", "fid") if m in rows[0]), None)
    if key is not None:
        best = min(rows, key=lambda r: r[key])
        print(f"best sigma_rel by {key}: {best['sigma_rel']:g} ({key} {best[key]:.4g})")


def _cmd_slurm(ns: argparse.Namespace) -> None:
    from lit_gen.scale.slurm import recipe_root, sbatch_script

    overrides = list(ns.overrides)
    if overrides and overrides[0] == "--":
        overrides = overrides[1:]
    # Validate the recipe (keys, types) here, not on the cluster after the job waited in the queue.
    args = [arg for config in ns.config for arg in ("-c", config)] + overrides
    lightning_cli([*args, f"--trainer.num_nodes={ns.nodes}", f"--trainer.devices={ns.gpus_per_node}"], False, False)
    script = sbatch_script(
        ns.config,
        ns.nodes,
        ns.gpus_per_node,
        time=ns.time,
        partition=ns.partition,
        account=ns.account,
        job_name=ns.job_name,
        cpus_per_task=ns.cpus_per_task,
        overrides=overrides,
    )
    (Path(recipe_root(ns.config, overrides)) / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM opens logs there
    if ns.out:
        Path(ns.out).write_text(script)
        print(f"wrote {ns.out}; submit it with: sbatch {ns.out}", file=sys.stderr)
    else:
        sys.stdout.write(script)


def _cmd_pipeline(ns: argparse.Namespace) -> None:
    from lit_gen.pipeline import Pipeline, Runner, auto_jobs

    recipe = ns.config or str(Path(__file__).resolve().parents[1] / "recipes" / "pipelines" / "digits.yaml")
    if not ns.config and not Path(recipe).is_file():
        recipe = "recipes/pipelines/digits.yaml"
    pipeline = Pipeline.read(recipe)
    jobs = auto_jobs(pipeline) if ns.jobs is None else ns.jobs
    runner = Runner(pipeline, ns.out, tiny=ns.tiny, log=lambda line: print(line, flush=True), jobs=jobs)
    results = runner.run()
    print(f"results: {results}; sample grids: {ns.out}/*.png; TensorBoard: tensorboard --logdir {ns.out}")
    if runner.report is not None:
        print(f"report: {runner.report} (open it in a browser)")  # the last line: where to look


def _cmd_report(ns: argparse.Namespace) -> None:
    from lit_gen.report import write_report

    print(f"wrote {write_report(ns.source, ns.out)}")


def _tools_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-gen", description="lit_gen: diffusion teachers and fast students.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in TRAIN_VERBS:
        sub.add_parser(verb, help=f"LightningCLI {verb}: lit-gen {verb} -c RECIPE.yaml [--key value ...]")

    p = sub.add_parser("shards", help="write WebDataset shards + dataset.json from images, arrays or built-ins")
    p.add_argument("src", help="image folder (class = sub-folder), .npy/.npz, builtin:digits, builtin:toy2d:<name>")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    p.add_argument("--image-size", type=int, default=None, help="resize shorter side + centre-crop to this size")
    p.add_argument("--seed", type=int, default=0, help="seed of the write order, split and built-ins (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction in OUT/val (OUT/train)")
    p.add_argument("--workers", type=int, default=1, help="parallel encoding processes (same bytes for any value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    # Latent shards (issue 17): images -> a diffusers AutoencoderKL's latents x scaling_factor (lit_gen.latents).
    p.add_argument("--encode", default=None, help="VAE folder, pipeline folder with vae/, or latent teacher file")
    p.add_argument("--encode-mode", default="sample", help="--encode: sample (posterior draw, default) or mean")
    p.add_argument("--device", default="cpu", help="--encode: where the VAE runs (default cpu)")
    p.set_defaults(func=_cmd_shards)

    p = sub.add_parser("sample", help="sample from a checkpoint or exported file to a PNG picture or .npy array")
    p.add_argument("--ckpt", required=True, help="a .ckpt written by lit-gen fit or an exported .safetensors")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, teachers 18)")
    p.add_argument("--sampler", default=None, help="heun | euler | ddim (default: the model's, teachers heun)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same samples")
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional models; default random)")
    # guidance (issue 18): CFG, autoguidance with a carried guiding model, or w fed to a w-conditioned student
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance weight w (default 1 = none): classifier-free, autoguidance if the file carries a guiding "
        "model, or the input of a w-conditioned student",
    )
    p.add_argument(
        "--allow-extrapolation", action="store_true", help="let a w-conditioned student run outside its trained w range"
    )
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", required=True, help="FILE.png (grid / density picture) or FILE.npy (data units)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("export", help="checkpoint -> one self-describing .safetensors file")
    p.add_argument("--ckpt", required=True, help="a .ckpt written by lit-gen fit")
    p.add_argument("--out", required=True, help="FILE.safetensors")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--guide", default=None, help="a guiding model to carry in the file (autoguidance, issue 18)")
    p.add_argument(
        "--keep-adapters",
        action="store_true",
        help="a LoRA student: keep base and adapters apart (default: merge them into a plain student)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("phema", help="post-hoc EMA (EDM2): reconstruct the EMA of any width from a run's snapshots")
    p.add_argument("run_dir", help="a run folder whose recipe listed callbacks.phema.PostHocEMA (RUN_DIR/phema/)")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True, help="EMA widths to reconstruct")
    p.add_argument("--out", required=True, help="folder for phema-<sigma_rel>.safetensors files")
    p.add_argument("--ckpt", default=None, help="checkpoint with the model description (default RUN_DIR last.ckpt)")
    p.add_argument("--at-step", type=int, default=None, help="reconstruct the EMA at this step (default: the last)")
    p.add_argument("--ref", default=None, help="reference shards: also evaluate each width and name the best")
    p.add_argument("--metric", nargs="+", default=None, help="metrics of the sweep (default: eval's)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="sampler steps of the sweep (default: model's)")
    p.add_argument("--n", type=int, default=None, help="samples per sweep row")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the sweep")
    p.add_argument("--device", default="cpu", help="torch device of the sweep")
    p.set_defaults(func=_cmd_phema)

    p = sub.add_parser("slurm", help="print a requeue-safe sbatch file that runs lit-gen fit on a SLURM cluster")
    p.add_argument("-c", "--config", action="append", required=True, help="recipe YAML (repeat for overlays)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= tasks) per node")
    p.add_argument("--time", default="24:00:00", help="time limit per allocation (default 24:00:00; requeues)")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--job-name", default=None, help="job name (default: <dataset>-<method> of the last recipe)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per GPU task (default 8)")
    p.add_argument("--out", default=None, help="write the file here instead of printing it")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="extra lit-gen fit arguments after --")
    p.set_defaults(func=_cmd_slurm)

    from lit_gen.eval.command import add_parser as add_eval_parser

    add_eval_parser(sub)

    from lit_gen.importers.command import add_parser as add_import_parser

    add_import_parser(sub)

    p = sub.add_parser("report", help="one self-contained HTML page: metrics, sample grids, curves, configs")
    p.add_argument("source", help="a run folder (trainer.default_root_dir) or a pipeline/quickstart --out folder")
    p.add_argument("--out", default=None, help="the HTML file (default SOURCE/report.html)")
    p.set_defaults(func=_cmd_report)

    for verb, text in (
        ("quickstart", "the main job on built-in digits: shards -> teacher -> TRACT, CD, f-distill -> metrics table"),
        ("pipeline", "run a multi-stage pipeline recipe (recipes/pipelines/*.yaml), resuming finished stages"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("-c", "--config", required=verb == "pipeline", default=None, help="pipeline recipe YAML")
        p.add_argument("--out", default=f"runs/{verb}", help=f"output folder (default runs/{verb})")
        p.add_argument("--tiny", action="store_true", help="a few-minute smoke run (numbers are not meaningful)")
        p.add_argument(
            "--jobs",
            type=int,
            default=None if verb == "quickstart" else 1,
            help="fit stages run at once, each its own process sharing the CPU cores (default: "
            + (
                "every fit stage that can run at once, up to two per core)"
                if verb == "quickstart"
                else "1, one stage at a time)"
            ),
        )
        p.set_defaults(func=_cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> Any:
    from lit_gen.console import quiet_known_noise, split_verbose

    argv, verbose = split_verbose(list(sys.argv[1:] if argv is None else argv))
    quiet_known_noise(verbose or None)
    try:
        if argv and argv[0] in TRAIN_VERBS:
            lightning_cli(argv)
            return 0
        ns = _tools_parser().parse_args(argv)
        ns.func(ns)
        return 0
    except LitGenError as err:
        print(f"lit-gen: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        from jsonargparse import ArgumentError
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        message = find_user_error(err)
        if message is None and isinstance(err, MisconfigurationException):
            message = " ".join(str(err).split())  # Lightning's own configuration errors are user-facing sentences
        if message is None and isinstance(err, pickle.UnpicklingError):
            message = (
                f"refusing to load a checkpoint holding objects that would run code when unpickled ({first_line(err)})"
            )
        if message is None and isinstance(err, ArgumentError):
            message = f"{condense(str(err))} (see lit-gen {argv[0] if argv else ''} --help)"
        if message is None:
            raise
        print(f"lit-gen: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("lit-gen: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
