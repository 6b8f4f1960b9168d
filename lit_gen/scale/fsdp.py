"""FSDP as lit_gen's second scale engine: PyTorch's FSDP2 (``fully_shard``) on Lightning's ``ModelParallelStrategy``.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1, ``FullyShardedDataParallel``):
- FSDP1 flattens each wrapped unit's parameters into one ``FlatParameter``; outside the unit's forward the original
  parameters are 1-D views of this rank's slice of it (empty on some ranks). lit_gen reads parameters outside forward
  in several places: the EMA callback averages ``net`` after every step, f-distill lerps its ``net_ema`` towards
  ``net`` in ``optimizer_step``, and f-distill's generator-side terms call the fake score and discriminator with
  detached weights (``torch.func.functional_call``) and read the teacher's feature levels without its ``forward``.
  Under FSDP1 those see flat slices whose shapes differ from network to network (``net`` and ``net_ema`` are cut at
  different offsets of different flat parameters).
- FSDP2 shards every parameter on its dim 0 as a ``DTensor`` that keeps its shape and name (Zhao et al. 2023,
  "PyTorch FSDP"; torch docs "FSDP2 ``fully_shard``"): one torch optimizer with parameter groups works on them as it
  does on ordinary tensors (f-distill's three named groups and its emptying of the inactive group for a step), frozen
  and trainable modules sit side by side without ``use_orig_params`` caveats, and ``lerp_`` / ``copy_`` /
  ``clip_grad_norm_`` act shard-wise (``net`` and ``net_ema`` are sharded alike, so the EMA update is local).
- Lightning 2.6's ``FSDPStrategy`` refuses a CPU accelerator in its accelerator connector ("The strategy `fsdp`
  requires a GPU accelerator, but received `accelerator='cpu'`"); ``ModelParallelStrategy`` does not, and FSDP2 runs
  on CPU processes over gloo (all-gather and reduce-scatter), so this engine is tested in CI without GPUs and needs
  no bypass subclass (unlike ``lit_gen.scale.deepspeed_cpu``). ``recipes/scale/fsdp_cpu.yaml`` is that setup.

What is sharded (``sharding_plan``, a named table per method; other methods are refused with one line until tested):
- *own units* (``fully_shard`` per network: gathered only around its own forward, resharded after it): the
  networks the method reaches only through their ``forward`` — the teacher method's ``net``; f-distill's generator
  ``net``, its EMA ``net_ema`` (sharded like ``net``) and the fake score ``fake_net`` (unless the discriminator reads
  the fake score's features, ``disc_features: fake_score``);
- *frozen modules* (``teacher_net``, ``guide_net``): replicated, not wrapped by FSDP (``ignored_params``), no
  gradients, no optimizer state, cast to the compute dtype (bf16 under bf16-mixed) — DESIGN.md "Scale";
- *the root unit*: everything else (f-distill's discriminator head): sharded at rest, gathered for the training step.
  The step runs inside the root module's forward (Lightning's forward redirection, as for DDP), so FSDP's hooks
  gather, reshard and reduce-scatter exactly as for any FSDP model.

A sharded network's forward is a collective (every rank all-gathers its unit), so the callbacks that sample on rank 0
only (``callbacks.sample_grid.SampleGrid``, ``callbacks.evaluate.Evaluate``) take ``full_network``: every rank
gathers the weights into a plain copy, and rank 0 samples from it. f-distill's critic steps add their exactly-zero
generator gradient only to non-DTensor parameters (FSDP needs none; a DTensor term cannot join the plain loss).

Checkpoints (sharded only): a folder written with ``torch.distributed.checkpoint`` (DCP) — one
``__<rank>_0.distcp`` file per rank, DCP's ``.metadata``, Lightning's non-tensor state in ``meta.pt`` — and last, by
rank 0 after a barrier, the marker ``lit_gen_complete.json``. Tensor-valued checkpoint entries that hold DTensors
(the EMA callback's ``ema_state_dict``) are saved through DCP as well, sharded. ``callbacks.checkpoint.Checkpoint``
writes the folder as ``NAME.partial`` and renames it, so a kill mid-save leaves the previous checkpoint; a folder
without the marker (written by another path and interrupted) is refused on resume and export with one line.
Resuming needs the world size that wrote the folder (checked first). Reading never unpickles code: DCP's
``.metadata`` pickle goes through ``errors.load_restricted_pickle`` with DCP's metadata records allow-listed, its
non-tensor items and ``meta.pt`` through ``torch.load(weights_only=True)`` (DCP itself uses ``pickle.load`` and
``weights_only=False`` there). ``read_fsdp_checkpoint`` consolidates a folder into full fp32 tensors in one process
(``lit-gen export``, ``--model.init_args.teacher FOLDER``).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lit_gen.errors import LitGenError, first_line, load_restricted_pickle, load_torch_file

META_FILE = "meta.pt"  # Lightning's name (lightning.fabric.utilities.load._METADATA_FILENAME)
COMPLETE_FILE = "lit_gen_complete.json"  # written last: a folder without it is an interrupted save
FSDP_KEY = "lit_gen_fsdp"  # {"format", "world_size", "sharded": [top-level keys saved through DCP]}
FORMAT = 1
# Lightning's ModelParallelStrategy refuses the others (16-mixed needs a sharded gradient scaler it does not have).
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")

# method_name -> networks sharded as their own FSDP units (module docstring); tested in tests/test_scale_fsdp.py.
OWN_UNITS: dict[str, tuple[str, ...]] = {
    "teacher": ("net",),
    "fdistill": ("net", "net_ema", "fake_net"),
}


# ------------------------------------------------------------------------------------------------ sharding plan
def sharding_plan(module: nn.Module) -> tuple[list[str], list[str]]:
    """(own units, frozen replicated modules) of a lit_gen method: names of its top-level submodules.

    Own units come from ``OWN_UNITS``; frozen modules are the other top-level submodules whose parameters are all
    frozen; the remaining parameters form the root unit. One line for a method FSDP is not tested with."""
    method = getattr(module, "method_name", type(module).__name__)
    if method not in OWN_UNITS:
        raise LitGenError(
            f"FSDP (lit_gen.scale.fsdp.FSDP) is tested for the {' and '.join(OWN_UNITS)} methods, not {method!r}; "
            "use recipes/scale/ddp.yaml or a DeepSpeed overlay for it"
        )
    children = dict(module.named_children())
    own = [name for name in OWN_UNITS[method] if children.get(name) is not None]
    if method == "fdistill" and getattr(module, "disc_features", "teacher") == "fake_score":
        own = [name for name in own if name != "fake_net"]  # the head reads its features without its forward
    frozen = [
        name
        for name, child in children.items()
        if name not in own
        and any(True for _ in child.parameters())
        and not any(p.requires_grad for p in child.parameters())
    ]
    return own, frozen


def apply_sharding(
    module: nn.Module, mesh: Any, reshard_after_forward: bool = True, frozen_dtype: torch.dtype = torch.float32
) -> tuple[list[str], list[str]]:
    """``fully_shard`` by ``sharding_plan``: the own units first, then the root with the frozen modules left out
    (``ignored_params``: replicated, cast to ``frozen_dtype``). Returns the plan."""
    from torch.distributed.fsdp import fully_shard

    own, frozen = sharding_plan(module)
    ignored: set[nn.Parameter] = set()
    for name in frozen:
        child = getattr(module, name)
        child.to(frozen_dtype)
        ignored.update(child.parameters())
    for name in own:
        fully_shard(getattr(module, name), mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, ignored_params=ignored)
    return own, frozen


def check_precision(precision: Any) -> None:
    """One line for a precision FSDP cannot run here (before any process starts)."""
    value = str(precision) if precision is not None else "32-true"
    value = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}.get(value, value)
    if value not in PRECISIONS:
        raise LitGenError(
            f"FSDP (lit_gen.scale.fsdp.FSDP) cannot train with precision {value!r}: it runs "
            f"{', '.join(PRECISIONS)} (16-mixed needs a sharded gradient scaler that Lightning's ModelParallelStrategy "
            "does not provide); use bf16-mixed"
        )


def _compute_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


# ------------------------------------------------------------------------------------------------ safe DCP reading
def _metadata_globals() -> dict[str, Any]:
    """What DCP's ``.metadata`` pickle may name: DCP's plain metadata records, torch sizes/dtypes/layouts, paths."""
    import collections
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[str, Any] = {}
    for module, names in (
        (metadata, ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                    "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")),
        (filesystem, ("_StorageInfo", "_StoragePrefix")),
    ):  # fmt: skip
        for name in names:
            if hasattr(module, name):
                allowed[f"{module.__name__}.{name}"] = getattr(module, name)
    allowed["torch.Size"] = torch.Size
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[f"torch.{name}"] = value
    allowed["torch.serialization._get_layout"] = _layout  # torch pickles a layout as _get_layout("torch.strided")
    allowed["collections.OrderedDict"] = collections.OrderedDict
    allowed["pathlib.PosixPath"] = pathlib.PosixPath
    allowed["pathlib.WindowsPath"] = pathlib.WindowsPath
    return allowed


def _layout(name: str) -> torch.layout:
    """``torch.serialization._get_layout`` restricted to looking up a layout by name."""
    value = getattr(torch, str(name).rpartition(".")[2], None)
    if not isinstance(value, torch.layout):
        raise LitGenError(f"unknown tensor layout {name!r} in an FSDP checkpoint's metadata")
    return value


def _safe_reader(path: Path) -> Any:
    """DCP's ``FileSystemReader`` whose ``.metadata`` is read by a restricted unpickler (DCP uses ``pickle.load``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            file = self._get_metadata_path(kwargs.get("rank"))
            data = load_restricted_pickle(file, f"FSDP checkpoint metadata {file}", _metadata_globals())
            if not isinstance(data, Metadata):
                raise LitGenError(f"{file} is not a torch.distributed.checkpoint metadata file")
            if getattr(data, "storage_meta", None) is None:
                data.storage_meta = StorageMeta()
            data.storage_meta.load_id = self.load_id
            return data

    return SafeFileSystemReader(str(path))


def _safe_planner(**kwargs: Any) -> Any:
    """DCP's ``DefaultLoadPlanner`` whose non-tensor items load with ``weights_only=True`` (DCP: ``False``)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            fqn = read_item.dest_index.fqn
            obj = load_torch_file(value, f"FSDP checkpoint item {fqn}")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeLoadPlanner(**kwargs)


def is_fsdp_checkpoint(path: str | Path) -> bool:
    """A folder written by this strategy (complete or not)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in (COMPLETE_FILE, META_FILE, ".metadata"))


def check_complete(path: str | Path) -> dict[str, Any]:
    """The completion record of an FSDP checkpoint folder; one line for a folder whose save did not finish."""
    path = Path(path)
    marker = path / COMPLETE_FILE
    if not marker.is_file() or not (path / ".metadata").is_file() or not (path / META_FILE).is_file():
        raise LitGenError(
            f"{path} is not a complete FSDP checkpoint (no {COMPLETE_FILE}: its save was interrupted); resume from "
            "the previous checkpoint or start again"
        )
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise LitGenError(f"cannot read {marker}: {first_line(err)}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise LitGenError(f"{marker} is not a lit_gen FSDP completion record (format {FORMAT})")
    return record


def _read_meta(path: Path) -> dict[str, Any]:
    meta = load_torch_file(path / META_FILE, f"FSDP checkpoint file {path / META_FILE}")
    if not isinstance(meta, dict):
        raise LitGenError(f"{path / META_FILE} is not a Lightning checkpoint metadata file")
    return meta


def read_fsdp_tensors(path: str | Path, tops: tuple[str, ...] = ("state_dict", "ema_state_dict")) -> dict[str, dict]:
    """The tensors saved under the top-level checkpoint keys ``tops`` (``state_dict``, ``ema_state_dict``,
    ``optimizer_0``), as full tensors in this process (no process group needed): ``{top: {inner key: tensor}}``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    check_complete(path)
    try:
        metadata = _safe_reader(path).read_metadata()
        template: dict[str, dict[str, torch.Tensor]] = {}
        for fqn, item in metadata.state_dict_metadata.items():
            top, _, inner = fqn.partition(".")
            if top in tops and isinstance(item, TensorStorageMetadata):
                template.setdefault(top, {})[inner] = torch.empty(item.size, dtype=item.properties.dtype)
        with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(template, storage_reader=_safe_reader(path), planner=_safe_planner(allow_partial_load=True),
                     no_dist=True)  # fmt: skip
    except LitGenError:
        raise
    except _FAILURES as err:  # noqa: BLE001 - damaged files fail in arbitrary ways (see errors.load_torch_file)
        raise LitGenError(f"cannot read FSDP checkpoint {path}: {type(err).__name__}: {first_line(err)}") from None
    return template


def read_fsdp_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of an FSDP folder (``lit_gen``, ``state_dict`` = full fp32/int tensors,
    ``ema_state_dict``, callbacks, ...), consolidated in this process (no process group needed)."""
    path = Path(path)
    check_complete(path)
    meta = _read_meta(path)
    info = meta.pop(FSDP_KEY, {}) or {}
    if "lit_gen" not in meta:
        raise LitGenError(f"{path} was not written by lit_gen (no 'lit_gen' section in {META_FILE})")
    tensors = read_fsdp_tensors(path)
    if not tensors.get("state_dict"):
        raise LitGenError(f"{path} holds no model weights")
    checkpoint = dict(meta)
    for key, values in tensors.items():
        checkpoint[key] = {k: v.float() if v.is_floating_point() else v for k, v in values.items()}
    checkpoint[FSDP_KEY] = info
    return checkpoint


def _failures() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    return (Exception, CheckpointException)


_FAILURES = _failures()


def _holds_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, dict) and any(isinstance(v, DTensor) for v in value.values())


# ------------------------------------------------------------------------------------------------ the strategy
class FSDP(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all devices × nodes, for lit_gen's methods (see the module docstring).

    Args:
        reshard_after_forward: free the gathered parameters of each own unit after its forward (ZeRO-3-like memory,
            gathered again for the backward); False keeps them until the backward (faster, more memory).
        frozen_dtype: dtype of the frozen replicated modules (teacher, guide): ``compute`` (bf16 under bf16-mixed/
            bf16-true, fp16 under 16-true, else fp32), or ``float32`` to keep them in full precision.
        process_group_backend: ``nccl`` / ``gloo`` (default: Lightning's choice for the device).
        timeout: collective timeout.
    """

    strategy_name = "lit_gen_fsdp"

    def __init__(
        self,
        reshard_after_forward: bool = True,
        frozen_dtype: str = "compute",
        process_group_backend: str | None = None,
        timeout: Any = None,
    ) -> None:
        from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

        if frozen_dtype not in ("compute", "float32"):
            raise LitGenError(f"FSDP frozen_dtype must be 'compute' or 'float32', got {frozen_dtype!r}")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=default_pg_timeout if timeout is None else timeout,
        )
        self.reshard_after_forward = bool(reshard_after_forward)
        self.frozen_dtype = frozen_dtype
        self.plan: tuple[list[str], list[str]] | None = None

    @classmethod
    def check_trainer_config(cls, trainer: Any) -> None:
        """Called by the CLI on the parsed ``trainer`` section, before anything is built."""
        check_precision(getattr(trainer, "precision", None))

    # -------------------------------------------------------------------------------------------- set-up
    def setup_environment(self) -> None:
        # One data-parallel mesh dimension over every rank (FSDP), no tensor parallelism.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    @property
    def precision_name(self) -> str:
        return str(getattr(self.precision_plugin, "precision", "32-true"))

    def setup(self, trainer: Any) -> None:
        # ModelParallelStrategy.setup with lit_gen's sharding plan instead of a required `configure_model` hook.
        assert self.model is not None and self.accelerator is not None
        check_precision(self.precision_name)
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model.to(self.root_device)
        self.shard(self.lightning_module)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def shard(self, module: nn.Module) -> None:
        """``apply_sharding`` on this run's data-parallel mesh, frozen modules in the compute dtype (or fp32)."""
        dtype = _compute_dtype(self.precision_name) if self.frozen_dtype == "compute" else torch.float32
        self.plan = apply_sharding(module, self.device_mesh["data_parallel"], self.reshard_after_forward, dtype)

    # The LightningModule is the root FSDP module: run its steps through its forward so FSDP's hooks fire.
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.train_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._forward_redirection(self.model, self.lightning_module, "test_step", *args, **kwargs)

    # -------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        if storage_options is not None:
            raise TypeError("lit_gen's FSDP strategy does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            if path.is_file() or path.is_symlink():
                path.unlink()
            elif path.is_dir():
                import shutil

                shutil.rmtree(path)
            path.mkdir(parents=True)
        self.barrier()
        sharded: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
        for idx, state in enumerate(checkpoint.pop("optimizer_states", [])):
            sharded[f"optimizer_{idx}"] = state
        for key in [k for k, v in checkpoint.items() if _holds_dtensor(v)]:
            sharded[key] = checkpoint.pop(key)  # e.g. the EMA callback's ema_state_dict (DTensors)
        checkpoint[FSDP_KEY] = {"format": FORMAT, "world_size": self.world_size, "sharded": sorted(sharded)}
        dcp.save(sharded, storage_writer=FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True))
        if self.is_global_zero:
            torch.save(checkpoint, path / META_FILE)
        self.barrier()
        if self.is_global_zero:
            record = {"format": FORMAT, "world_size": self.world_size, "global_step": checkpoint.get("global_step")}
            tmp = path / f"{COMPLETE_FILE}.tmp"
            with open(tmp, "w") as handle:
                handle.write(json.dumps(record))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path / COMPLETE_FILE)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_fsdp_checkpoint(path):
            raise LitGenError(
                f"{path} is not an FSDP checkpoint folder; a checkpoint written by another strategy resumes with it "
                "(or export its weights and start from them)"
            )
        record = check_complete(path)
        written = int(record.get("world_size", -1))
        if written != self.world_size:
            raise LitGenError(
                f"{path} was written by {written} FSDP ranks but this run has {self.world_size}: resume with the same "
                "number of devices x nodes, or start a new run from its weights (lit-gen export, then model.teacher "
                "or an init from the file)"
            )
        meta = _read_meta(path)
        info = meta.pop(FSDP_KEY, {}) or {}
        assert self.model is not None and self.lightning_module is not None
        model_state = get_model_state_dict(self.model)
        state: dict[str, Any] = {"state_dict": model_state}
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if fitting:
            for idx, optimizer in enumerate(self.optimizers):
                state[f"optimizer_{idx}"] = get_optimizer_state_dict(self.model, optimizer)
        try:
            metadata = _safe_reader(path).read_metadata()
            for key in info.get("sharded", []):
                if key == "state_dict" or key.startswith("optimizer_"):
                    continue
                inner = [fqn.partition(".")[2] for fqn in metadata.state_dict_metadata if fqn.startswith(f"{key}.")]
                missing = [k for k in inner if k not in model_state]
                if missing:
                    raise LitGenError(f"{path}: {key} holds {missing[0]}, which this model does not have")
                state[key] = {k: torch.empty_like(model_state[k], dtype=torch.float32) for k in inner}
            dcp.load(state, storage_reader=_safe_reader(path), planner=_safe_planner())
        except LitGenError:
            raise
        except _FAILURES as err:  # noqa: BLE001 - damaged files fail in arbitrary ways
            raise LitGenError(
                f"cannot resume from FSDP checkpoint {path}: {type(err).__name__}: {first_line(err)}"
            ) from None
        strict = self.lightning_module.strict_loading
        set_model_state_dict(self.model, state.pop("state_dict"), options=StateDictOptions(strict=strict))
        if fitting:
            for idx, optimizer in enumerate(self.optimizers):
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state.pop(f"optimizer_{idx}"))
        meta.update(state)  # the DTensor entries (ema_state_dict) for the callbacks' on_load_checkpoint
        return meta


# ------------------------------------------------------------------------------------------------ rank-0 sampling
def is_sharded(net: nn.Module) -> bool:
    """Whether FSDP shards ``net``'s parameters (DTensors): its forward is then a collective of all ranks."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in net.parameters())


@contextlib.contextmanager
def full_network(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` itself, or — when FSDP shards it — a plain copy with the full weights (rebuilt from its lit_gen spec),
    so that rank 0 alone can run it (the sample-grid and evaluation callbacks sample on rank 0 only; a sharded
    forward there would wait forever for the other ranks' all-gathers). Every rank must enter: the weights are
    all-gathered (``DTensor.full_tensor``)."""
    from torch.distributed.tensor import DTensor

    from lit_gen.spec import build, describe

    if not is_sharded(net):
        yield net
        return
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in net.state_dict().items()}
    device = next(iter(state.values())).device
    with torch.random.fork_rng(devices=[]):  # building initialises weights: keep training's RNG stream untouched
        copy = build(describe(net))
    copy = copy.to(device)
    copy.load_state_dict(state)
    yield copy.train(net.training).requires_grad_(False)


# ------------------------------------------------------------------------------------------------ measurement
def state_bytes_per_rank(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards of DTensors, whole plain
    tensors) — a ``torch.cuda``-free count for the memory table."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def size(t: torch.Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    out = {"params": 0, "frozen_params": 0, "grads": 0, "optimizer": 0}
    for p in module.parameters():
        out["params" if p.requires_grad else "frozen_params"] += size(p)
        if p.grad is not None:
            out["grads"] += size(p.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            out["optimizer"] += sum(size(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


# ------------------------------------------------------------------------------------------------ GPU checks
def gpu_check(workdir: str | Path, steps: int = 20, accelerator: str = "gpu", precision: str = "bf16-mixed") -> dict:
    """The FSDP checks the CPU tests cannot make, for ``benchmarks/gpu.py`` on the lent GPU: the CUDA/NCCL path
    (Lightning passes ``device_id`` to the process group, FSDP2 shards onto the CUDA mesh and overlaps its
    collectives on CUDA streams; gloo on CPU takes none of these paths), bf16-mixed under CUDA autocast, and the peak
    CUDA memory of an FSDP step. On one device (world size 1) in this process, from the CLI and the real recipes:
    the toy2d teacher fits ``steps`` steps, a second run stops at ``steps // 2`` and resumes to ``steps`` and must
    end bit-identical (weights, EMA, optimizer state); the folder exports to one safetensors file that samples;
    f-distill then trains ``steps`` steps from that folder as its teacher (frozen teacher in bf16).

    Returns ``{"teacher_s", "fdistill_s", "resume_bit_exact", "export_finite", "peak_memory_bytes"}``
    (``peak_memory_bytes`` None without CUDA). ``accelerator="cpu"`` runs the same code on CPU (a smoke test).
    """
    import time

    from lit_gen.cli import main
    from lit_gen.export import export, load_model

    workdir = Path(workdir)
    repo = Path(__file__).resolve().parents[2]
    shards = workdir / "toy2d_gmm8"
    if not shards.exists():
        main(["shards", "builtin:toy2d:gmm8:20000", "--out", str(shards), "--shard-size", "5000", "--no-progress"])
    cuda = accelerator == "gpu" and torch.cuda.is_available()
    overlay = repo / "recipes/scale" / ("fsdp.yaml" if accelerator == "gpu" else "fsdp_cpu.yaml")
    common = ["-c", str(overlay), f"--trainer.accelerator={accelerator}", "--trainer.devices=1",
              f"--trainer.precision={precision}", f"--data.init_args.shards={shards}",
              "--trainer.enable_progress_bar=false"]  # fmt: skip

    def fit(recipe: str, root: Path, max_steps: int, *extra: str) -> float:
        start = time.perf_counter()
        main(["fit", "-c", str(repo / recipe), *common, f"--trainer.default_root_dir={root}",
              f"--trainer.max_steps={max_steps}", *extra])  # fmt: skip
        return time.perf_counter() - start

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    teacher_s = fit("recipes/toy2d/teacher.yaml", workdir / "teacher", steps)
    fit("recipes/toy2d/teacher.yaml", workdir / "resumed", steps // 2)
    fit("recipes/toy2d/teacher.yaml", workdir / "resumed", steps, "--ckpt_path", "last")
    folder, resumed = workdir / "teacher/checkpoints/last.ckpt", workdir / "resumed/checkpoints/last.ckpt"
    tops = ("state_dict", "ema_state_dict", "optimizer_0")
    a, b = read_fsdp_tensors(folder, tops), read_fsdp_tensors(resumed, tops)
    bit_exact = a.keys() == b.keys() and all(
        a[t].keys() == b[t].keys() and all(torch.equal(a[t][k], b[t][k]) for k in a[t]) for t in a
    )
    model = load_model(export(folder, workdir / "teacher.safetensors"))
    finite = bool(torch.isfinite(model.sample(256, steps=8)).all())
    fdistill_s = fit("recipes/toy2d/fdistill.yaml", workdir / "fdistill", steps, f"--model.init_args.teacher={folder}")
    peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    return {"teacher_s": teacher_s, "fdistill_s": fdistill_s, "resume_bit_exact": bit_exact,
            "export_finite": finite, "peak_memory_bytes": peak}  # fmt: skip
