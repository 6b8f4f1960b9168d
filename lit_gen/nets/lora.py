"""LoRA students: low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") over ONE
shared, frozen copy of the teacher's weights, built on Hugging Face ``peft`` (``peft.inject_adapter_in_model``, which
works on any ``nn.Module``: no transformers config needed).

A LoRA layer computes W x + (α / r) B A x with the base weight W frozen, A ∈ R^{r×k} (Kaiming-uniform) and
B ∈ R^{d×r} (zeros), so a fresh adapter is exactly the base layer (LoRA Sec. 4.1). peft adapts ``nn.Linear`` and
``nn.Conv2d`` (a Conv2d adapter is a k×k conv to r channels followed by a 1×1 conv back).

How a distillation method uses it (``--model.init_args.lora "{rank: r, alpha: a, targets: [...]}"``; TRACT/BTD,
consistency distillation, f-distill, sCM): ``adapt_method`` turns each trained network (the student; f-distill's fake
score too) into the teacher's architecture whose every base parameter IS the frozen teacher's ``nn.Parameter`` object
(the same storage), with its own adapters on top; the frozen followers of the student (inference EMA, self-teacher,
consistency target, TRACT's later-phase teacher) are clones that share the same base and copy only the adapters. So
teacher + generator + fake score hold one base network instead of three. Parameters the teacher does not have (the
zero-initialised w embedding ``map_guide.`` of a w-conditioned student) stay the student's own and train fully.

Two separate peft injections over shared parameters, not one model with two named adapters switched by
``set_adapter``: f-distill's single backward needs the generator's and the fake score's adapters active in the same
step (peft's switching toggles ``requires_grad`` and routes the whole model through one adapter at a time).

Defaults (``DEFAULT_TARGETS``): alpha = rank (LoRA Sec. 4.1: "we simply set α to the first r we try and do not tune
it", scale α/r = 1; peft's own defaults r = α = 8 agree), rank 8, no adapter dropout. Targets, per network class:
every attention, convolution and conditioning projection inside the residual blocks, as LCM-LoRA / DMD2's SDXL
LoRA (diffusers ``train_lcm_distill_lora_sdxl.py``: ``to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj,
ff.net.2, conv1, conv2, conv_shortcut, downsamplers.0.conv, upsamplers.0.conv, time_emb_proj``); the input/output
layers and the noise/label embedding MLPs stay frozen.

Checkpoints (decision): the base is carried, once. ``torch.save`` writes a storage shared by several state-dict
entries once, so a LoRA checkpoint holds one base copy (a full f-distill checkpoint holds three) and stays
self-describing (``lit-gen sample/export --ckpt`` need only the file). The base's sha256 (``base_sha256``) is
recorded in the ``lit_gen`` section, and a resume verifies that the recipe's teacher is the one the run was trained
over (``check_resume``), one line otherwise. Export merges the adapters (W ← W + (α/r) B A, peft's ``merge``) into a
plain student by default; ``--keep-adapters`` keeps base and adapters apart, and loading such a file merges them.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from lit_gen.errors import LitGenError

ADAPTABLE = (nn.Linear, nn.Conv2d)  # what peft's LoRA adapts (and lit_gen's nets use)
OWN_PREFIXES = ("map_guide.",)  # student parameters the teacher lacks (zero-initialised w embedding): not shared
DEFAULT_RANK = 8
# Per network class: module-name suffixes (peft's matching: the name itself or ending in "." + target).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "UNet": ("conv0", "conv1", "skip", "qkv", "proj", "affine"),  # resblock convs, attention, emb projection
    "DiT": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"),
    "MLPDenoiser": ("fc1", "fc2", "modulation"),
    "DiffusersNet": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "time_emb_proj",
    ),  # fmt: skip
}


class LoRASpec(TypedDict, total=False):
    """``--model.init_args.lora``: rank r, alpha α (scale α/r; default r), targets (module-name suffixes; default
    per network class, ``DEFAULT_TARGETS``), dropout on the adapter input (default 0)."""

    rank: int
    alpha: float
    targets: list[str]
    dropout: float


# ------------------------------------------------------------------------------------------------ configuration
def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve(spec: dict[str, Any], net: nn.Module) -> dict[str, Any]:
    """The full LoRA setting for ``net``: rank, alpha, dropout, targets and the module names they match. One line
    for an unknown key, a bad number, or a target that matches no adaptable (Linear / Conv2d) module."""
    if not isinstance(spec, dict):
        raise LitGenError(f"lora must be a mapping like {{rank: 8, alpha: 8, targets: [...]}}, got {spec!r}")
    unknown = sorted(set(spec) - set(LoRASpec.__annotations__))
    if unknown:
        raise LitGenError(
            f"unknown lora key(s) {', '.join(unknown)}; the keys are {', '.join(LoRASpec.__annotations__)}"
        )
    rank = spec.get("rank", DEFAULT_RANK)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LitGenError(f"lora rank must be a positive integer, got {rank!r}")
    alpha = spec.get("alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise LitGenError(f"lora alpha must be a positive number, got {alpha!r}")
    dropout = spec.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LitGenError(f"lora dropout must be in [0, 1), got {dropout!r}")
    kind = type(net).__name__
    targets = spec.get("targets")
    if targets is None:
        if kind not in DEFAULT_TARGETS:
            raise LitGenError(f"no default LoRA targets for a {kind}; name them: lora: {{targets: [...]}}")
        targets = list(DEFAULT_TARGETS[kind])
    elif isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets) or not targets:
        raise LitGenError(f"lora targets must be a non-empty list of module names, got {targets!r}")
    modules = {name: m for name, m in net.named_modules() if name}
    adaptable = [name for name, m in modules.items() if isinstance(m, ADAPTABLE) and not name.startswith(OWN_PREFIXES)]
    chosen: list[str] = []
    for target in targets:
        hits = [name for name in adaptable if _matches(name, target)]
        if not hits and spec.get("targets") is not None:
            others = [f"{n} ({type(m).__name__})" for n, m in modules.items() if _matches(n, target)]
            why = f"it matches only {', '.join(others[:3])}, which LoRA cannot adapt" if others else "no such module"
            example = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in adaptable})[:12])
            raise LitGenError(
                f"lora target {target!r} matches no nn.Linear / nn.Conv2d of the {kind} ({why}); its adaptable "
                f"layers are named e.g. {example}"
            )
        chosen += [h for h in hits if h not in chosen]
    if not chosen:
        raise LitGenError(f"the lora targets {targets} match no nn.Linear / nn.Conv2d module of the {kind}")
    return {
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": float(dropout),
        "targets": list(targets),
        "modules": sorted(chosen, key=list(modules).index),
    }


def inject(net: nn.Module, setting: dict[str, Any]) -> nn.Module:
    """Put peft LoRA layers (adapter ``default``) on ``setting["modules"]`` of ``net``, in place; returns ``net``."""
    from peft import LoraConfig, inject_adapter_in_model  # imported here: peft (+ transformers) is slow to import

    config = LoraConfig(
        r=setting["rank"],
        lora_alpha=setting["alpha"],
        lora_dropout=setting["dropout"],
        target_modules=list(setting["modules"]),  # full names: exactly these modules
        bias="none",
        init_lora_weights=True,  # A Kaiming-uniform, B = 0: the adapted net starts as the base (LoRA Sec. 4.1)
    )
    trainable = {id(p): p.requires_grad for p in net.parameters()}
    inject_adapter_in_model(config, net)
    # peft marks only adapter parameters trainable; give every other parameter its own flag back.
    for p in net.parameters():
        if id(p) in trainable:
            p.requires_grad_(trainable[id(p)])
    return net


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to a peft LoRA adapter."""
    return ".lora_" in f".{name}"


# ------------------------------------------------------------------------------------------------ sharing
def share_base(net: nn.Module, base: nn.Module) -> int:
    """Make every parameter of ``net`` that ``base`` has (same name and shape, outside ``OWN_PREFIXES``) the very
    ``nn.Parameter`` of ``base``, frozen; returns how many were shared. ``net``'s own copies are released."""
    base_params = dict(base.named_parameters())
    shared = 0
    for name, p in list(net.named_parameters()):
        q = base_params.get(name)
        if q is None or name.startswith(OWN_PREFIXES) or q.shape != p.shape:
            continue
        owner_name, _, attr = name.rpartition(".")
        net.get_submodule(owner_name)._parameters[attr] = q
        shared += 1
    for p in base.parameters():
        p.requires_grad_(False)
    return shared


def clone(net: nn.Module) -> nn.Module:
    """A deep copy of an adapted ``net`` that shares its frozen (base) parameters and copies everything else."""
    memo = {id(p): p for p in net.parameters() if not p.requires_grad}
    return copy.deepcopy(net, memo)


def fingerprint(module: nn.Module) -> str:
    """sha256 of the module's parameters (names, dtypes, shapes, bytes; sorted by name): the base's identity."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------ merging
@torch.no_grad()
def merge(net: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer (peft's ``merge``: W ← W + (α/r) B A) and put the plain base
    layer back in its place: ``net`` becomes an ordinary network of its class. In place; returns ``net``.
    The base weights are written to, so never call it on a network whose base is shared with a teacher."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name), child, module.get_base_layer())
    return net


def rebuild_merged(net: nn.Module, setting: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    """``net`` (a fresh network of the described class) adapted as ``setting`` says, loaded with ``tensors`` (base +
    adapter weights) and merged: a plain network. One line when the tensors do not fit."""
    inject(net, setting)
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LitGenError(
            f"the LoRA weights do not fit the described network (missing {len(missing)}, unexpected "
            f"{len(unexpected)}, e.g. {(missing or unexpected)[0]})"
        )
    return merge(net)


# ------------------------------------------------------------------------------------------------ methods
def adapt_method(
    owner: nn.Module,
    spec: dict[str, Any] | None,
    trained: Sequence[str] = ("net",),
    clones: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Turn ``owner``'s trained networks (attribute names ``trained``) into LoRA adapters over the frozen teacher
    ``owner.teacher_net`` (or, without a teacher, over the first trained net's own weights), and replace each
    attribute in ``clones`` (follower name → source name, e.g. ``{"net_ema": "net"}``) by a clone of the adapted
    source that shares its base. Records and returns ``owner.lora_info`` (the setting + ``base_sha256``);
    ``spec`` None does nothing. Called at the end of a method's ``__init__``, after its copies exist."""
    if spec is None:
        owner.lora_info = None
        return None
    teacher = getattr(owner, "teacher_net", None)
    first = getattr(owner, trained[0])
    setting = resolve(dict(spec), first)
    base = teacher if teacher is not None else first
    setting["base_sha256"] = fingerprint(base)
    for name in trained:
        net = getattr(owner, name)
        if teacher is not None:
            share_base(net, teacher)
        else:
            net.requires_grad_(False)
        own = {id(p) for n, p in net.named_parameters() if n.startswith(OWN_PREFIXES)}
        inject(net, setting)
        for n, p in net.named_parameters():
            p.requires_grad_(is_adapter(n) or id(p) in own)
    for follower, source in (clones or {}).items():
        old = getattr(owner, follower, None)
        if old is None:
            continue
        new = clone(getattr(owner, source)).requires_grad_(False)
        setattr(owner, follower, new.train(old.training))
    owner.lora_info = setting
    # One base shared by several modules has not been run under ZeRO-3 partitioning: refused (methods.base.setup).
    owner.supports_zero3 = False
    return setting


def check_resume(owner: nn.Module, checkpoint: dict[str, Any]) -> None:
    """A resumed run must use the LoRA setting and the base (teacher) it was trained with: one line otherwise."""
    have = (checkpoint.get("lit_gen") or {}).get("lora")
    want = getattr(owner, "lora_info", None)
    if have is None and want is None:
        return
    if (have is None) != (want is None):
        saved = "a LoRA" if have is not None else "a full (non-LoRA)"
        asked = "LoRA" if want is not None else "no LoRA"
        raise LitGenError(f"the checkpoint is {saved} student but the recipe asks for {asked}; resume with its recipe")
    keys = ("rank", "alpha", "dropout", "modules")
    if any(have.get(k) != want.get(k) for k in keys):
        diff = {k: (have.get(k), want.get(k)) for k in keys if have.get(k) != want.get(k)}
        raise LitGenError(f"the checkpoint's LoRA setting differs from the recipe's (checkpoint, recipe): {diff}")
    if have.get("base_sha256") != want.get("base_sha256"):
        raise LitGenError(
            f"the checkpoint's LoRA base (teacher sha256 {str(have.get('base_sha256'))[:12]}…) is not the recipe's "
            f"teacher {getattr(owner, 'teacher_path', '?')} (sha256 {want['base_sha256'][:12]}…); resume with the "
            "teacher the run was trained from"
        )
