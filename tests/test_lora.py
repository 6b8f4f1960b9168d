"""LoRA students (lit_gen.nets.lora, issue 20): adapters over one shared frozen teacher, gradients only to adapters,
merged export equal to the unmerged student, one base copy in f-distill (counted by storage), exact resume through
`lit-gen fit --ckpt_path last`, and one-line errors for bad LoRA settings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_gen.errors import LitGenError, load_torch_file
from lit_gen.export import LoadedModel, export, load_model
from lit_gen.methods.consistency import ConsistencyDistillation
from lit_gen.methods.fdistill import FDistill
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.methods.tract import TRACT
from lit_gen.nets import MLPDenoiser, UNet
from lit_gen.nets.lora import is_adapter, storage_bytes
from tests.conftest import REPO, run_cli


def write_teacher(path: Path, net: torch.nn.Module, data: dict) -> Path:
    """A teacher file from ``net`` (random weights, its zero output layer made non-zero), as `lit-gen fit` writes."""
    out = net.proj_out if hasattr(net, "proj_out") else net.out_conv
    torch.nn.init.normal_(out.weight, std=0.1)
    teacher = TeacherDiffusion(net=net)
    teacher.data_info = data
    torch.save({"state_dict": teacher.state_dict(), "lit_gen": teacher.describe()}, path)
    return path


@pytest.fixture(scope="module")
def mlp_teacher(toy_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    info = json.loads((toy_shards / "dataset.json").read_text())
    path = tmp_path_factory.mktemp("lora") / "mlp_teacher.ckpt"
    return write_teacher(path, MLPDenoiser(dim=2, hidden=32, depth=2), {k: info[k] for k in ("shape", "kind")})


@pytest.fixture(scope="module")
def unet_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = UNet(img_resolution=8, in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,), dropout=0.1)  # fmt: skip
    path = tmp_path_factory.mktemp("lora") / "unet_teacher.ckpt"
    return write_teacher(path, net, {"shape": [3, 8, 8], "num_classes": 0, "kind": "image"})


def randomize_adapters(*nets: torch.nn.Module) -> None:
    """Non-zero B matrices (a fresh adapter is exactly the base), as after some training."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in nets:
            for name, p in net.named_parameters():
                if is_adapter(name):
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("which", ["mlp", "unet"])
def test_only_adapter_parameters_receive_gradients(which: str, mlp_teacher: Path, unet_teacher: Path) -> None:
    teacher = mlp_teacher if which == "mlp" else unet_teacher
    method = FDistill(teacher=str(teacher), lora={"rank": 2}, gan_weight=0.0, divergence="rkl")
    randomize_adapters(method.net, method.fake_net)
    shape = [2] if which == "mlp" else [3, 8, 8]
    x, sigma = torch.randn(4, *shape), torch.full((4,), 1.5)
    for net in (method.net, method.fake_net):
        method.param.denoise(net, x, sigma, None).square().mean().backward()
    named = {**{f"net.{n}": p for n, p in method.net.named_parameters()}}
    named.update({f"fake_net.{n}": p for n, p in method.fake_net.named_parameters()})
    adapters = {n for n in named if is_adapter(n)}
    assert adapters and all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in adapters)
    assert all(p.grad is None and not p.requires_grad for n, p in named.items() if n not in adapters)
    assert all(p.grad is None for p in method.teacher_net.parameters())
    # The optimizer sees the adapters (and the discriminator head), never the base.
    groups = {g["name"]: g["params"] for g in method.trainable_parameters()}
    assert {id(p) for p in groups["generator"]} == {id(p) for n, p in method.net.named_parameters() if is_adapter(n)}
    # Every targeted layer of the default set is adapted; the input/output layers are not.
    modules = method.lora_info["modules"]
    assert ("proj_in" not in modules and "blocks.0.fc1" in modules) if which == "mlp" else "enc.0.conv0" in modules
    assert method.lora_info["alpha"] == 2.0  # alpha defaults to the rank


def test_fdistill_holds_one_base_copy(mlp_teacher: Path, unet_teacher: Path, tmp_path: Path) -> None:
    """Teacher, generator and fake score (and the generator's EMA) share one base storage; the checkpoint file
    holds it once too."""
    for teacher in (mlp_teacher, unet_teacher):
        full = FDistill(teacher=str(teacher), ema_halflife_steps=10)
        lora = FDistill(teacher=str(teacher), ema_halflife_steps=10, lora={"rank": 2})
        base = storage_bytes(lora.teacher_net.parameters())
        head = storage_bytes(lora.disc.parameters())
        adapters = [p for n, p in lora.named_parameters(remove_duplicate=False) if is_adapter(n)]
        own = [p for n, p in lora.named_parameters(remove_duplicate=False) if n.startswith(("net", "fake"))]
        own = [p for p in own if not any(p is q for q in lora.teacher_net.parameters())]
        # By storage: the whole module = one base + adapters (3 sets: generator, fake score, EMA) + head.
        assert storage_bytes(lora.parameters()) == base + storage_bytes(adapters) + head
        assert storage_bytes(own) == storage_bytes(adapters)
        for net in (lora.net, lora.fake_net, lora.net_ema):
            base_ptrs = {p.untyped_storage().data_ptr() for n, p in net.named_parameters() if not is_adapter(n)}
            assert base_ptrs == {p.untyped_storage().data_ptr() for p in lora.teacher_net.parameters()}
        assert storage_bytes(full.parameters()) > 3 * base  # teacher + generator + fake score + EMA, full copies
        lora_file, full_file = tmp_path / "lora.ckpt", tmp_path / "full.ckpt"
        torch.save({"state_dict": lora.state_dict()}, lora_file)
        torch.save({"state_dict": full.state_dict()}, full_file)
        assert lora_file.stat().st_size < 1.5 * base + 3 * storage_bytes(adapters) + head + 200_000
        assert full_file.stat().st_size > 3 * base


def test_tract_and_cd_followers_share_the_base(mlp_teacher: Path) -> None:
    tract = TRACT(teacher=str(mlp_teacher), schedule=(8, 2, 1), steps_per_phase=[2, 2], lora={"rank": 2})
    cd = ConsistencyDistillation(teacher=str(mlp_teacher), lora={"rank": 2})
    for method, followers in ((tract, ("net_ema", "self_teacher", "teacher_net")), (cd, ("target_net",))):
        base = storage_bytes(p for n, p in method.net.named_parameters() if not is_adapter(n))
        adapters = storage_bytes(p for n, p in method.named_parameters(remove_duplicate=False) if is_adapter(n))
        assert storage_bytes(method.parameters()) == base + adapters
        for name in followers:
            follower = getattr(method, name)
            assert not any(p.requires_grad for p in follower.parameters())
            for (n, a), (_, b) in zip(follower.state_dict().items(), method.net.state_dict().items(), strict=True):
                assert torch.equal(a, b), (name, n)  # adapters copied, base shared
    # A phase change hands the inference EMA's adapters to the teacher without touching the base.
    randomize_adapters(tract.net_ema)
    before = {n: p.clone() for n, p in tract.net.named_parameters() if not is_adapter(n)}
    tract.enter_phase(1)
    for (n, a), (_, b) in zip(tract.teacher_net.state_dict().items(), tract.net_ema.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert all(torch.equal(p, before[n]) for n, p in tract.net.named_parameters() if not is_adapter(n))


# ------------------------------------------------------------------------------------------------ export
def test_merged_export_samples_as_the_unmerged_student(unet_teacher: Path, tmp_path: Path) -> None:
    method = FDistill(teacher=str(unet_teacher), lora={"rank": 3, "alpha": 6}, gan_weight=0.0, divergence="rkl")
    randomize_adapters(method.net)
    method.data_info = method.teacher_description["data"]
    ckpt = tmp_path / "lora.ckpt"
    torch.save({"state_dict": method.state_dict(), "lit_gen": method.describe()}, ckpt)
    unmerged = LoadedModel(net=copy.deepcopy(method.net).eval(), param=method.param, description=method.describe())
    reference = unmerged.sample(6, steps=1, seed=3, raw=True)
    assert not torch.allclose(reference, load_model(unet_teacher).sample(6, steps=1, seed=3, raw=True), atol=1e-3)

    merged_file = export(ckpt, tmp_path / "merged.safetensors")
    tensors = load_file(str(merged_file))
    assert set(tensors) == set(UNet(**method.net.init_args).state_dict())  # an ordinary UNet's weights
    merged = load_model(merged_file)
    assert type(merged.net.enc[0].conv0) is torch.nn.Conv2d
    torch.testing.assert_close(merged.sample(6, steps=1, seed=3, raw=True), reference, rtol=1e-5, atol=1e-5)
    # The base in the file is the teacher's plus the merged update, W + (alpha / r) B A.
    layer = method.net.enc[0].affine
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(tensors["enc.0.affine.weight"], layer.base_layer.weight + delta)

    run_cli("export", "--ckpt", ckpt, "--out", tmp_path / "kept.safetensors", "--keep-adapters")
    kept_file = tmp_path / "kept.safetensors"
    assert any(is_adapter(k) for k in load_file(str(kept_file)))
    torch.testing.assert_close(load_model(kept_file).sample(6, steps=1, seed=3, raw=True), reference)
    torch.testing.assert_close(load_model(ckpt).sample(6, steps=1, seed=3, raw=True), reference)  # the .ckpt too
    # Merging for export never touched the live student's (shared) base.
    assert torch.equal(method.net.enc[0].conv0.base_layer.weight, method.teacher_net.enc[0].conv0.weight)


# ------------------------------------------------------------------------------------------------ resume
def _fit(recipe: str, teacher: Path, shards: Path, root: Path, steps: int, *extra: object) -> None:
    run_cli(
        "fit", "-c", REPO / recipe, "--model.init_args.teacher", teacher, "--data.init_args.shards", shards,
        "--trainer.default_root_dir", root, "--trainer.max_steps", steps, "--trainer.enable_progress_bar", "false",
        "--data.init_args.batch_size", 64, *extra,
    )  # fmt: skip


def _state(root: Path) -> dict:
    return load_torch_file(root / "checkpoints" / "last.ckpt", "ckpt")


@pytest.mark.parametrize(
    ("recipe", "extra", "cut", "total"),
    [
        ("recipes/toy2d/fdistill.yaml", [], 3, 5),
        ("recipes/toy2d/tract.yaml", ["--model.init_args.schedule", "[8, 2, 1]",
                                      "--model.init_args.steps_per_phase", "[3, 3]"], 4, 6),
    ],
    ids=["fdistill", "tract"],
)  # fmt: skip
def test_lora_resume_is_exact(recipe, extra, cut, total, mlp_teacher, toy_shards, tmp_path, capsys) -> None:
    lora = ["--model.init_args.lora", "{rank: 2, targets: [fc1, fc2]}", *extra]
    _fit(recipe, mlp_teacher, toy_shards, tmp_path / "straight", total, *lora)
    _fit(recipe, mlp_teacher, toy_shards, tmp_path / "cut", cut, *lora)
    _fit(recipe, mlp_teacher, toy_shards, tmp_path / "cut", total, *lora, "--ckpt_path", "last")
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "cut")
    assert a["global_step"] == b["global_step"] == total
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    # Adapters trained, the base did not move (it is the teacher's), the checkpoint records the base's sha256.
    teacher = load_torch_file(mlp_teacher, "teacher")["state_dict"]
    state = a["state_dict"]
    assert torch.equal(state["net.blocks.0.fc1.base_layer.weight"], teacher["net.blocks.0.fc1.weight"])
    assert not torch.equal(
        state["net.blocks.0.fc1.lora_B.default.weight"], torch.zeros_like(teacher["net.blocks.0.fc1.weight"][:, :2])
    )
    assert len(a["lit_gen"]["lora"]["base_sha256"]) == 64
    # Resuming over another teacher is one line, before any step.
    other = write_teacher(
        tmp_path / "other.ckpt", MLPDenoiser(dim=2, hidden=32, depth=2), dict(teacher_info(mlp_teacher))
    )
    for teacher, args, message in (
        (other, lora, "is not the recipe's teacher"),
        (mlp_teacher, extra, "LoRA student but the recipe asks for no LoRA"),
        (mlp_teacher, ["--model.init_args.lora", "{rank: 3, targets: [fc1, fc2]}", *extra], "LoRA setting differs"),
    ):
        with pytest.raises(SystemExit):
            _fit(recipe, teacher, toy_shards, tmp_path / "cut", total, *args, "--ckpt_path", "last")
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert _state(tmp_path / "cut")["global_step"] == total  # no step was taken


def teacher_info(path: Path) -> dict:
    return load_torch_file(path, "teacher")["lit_gen"]["data"]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_lora_settings_are_one_line_errors(mlp_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ({"targets": ["attn.qkv"]}, "lora target 'attn.qkv' matches no nn.Linear / nn.Conv2d of the MLPDenoiser"),
        ({"targets": ["norm"]}, "it matches only blocks.0.norm \\(LayerNorm\\)"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 2, "alpah": 4}, "unknown lora key\\(s\\) alpah"),
        ({"alpha": -1}, "alpha must be a positive number"),
    ]
    for spec, message in cases:
        for cls in (FDistill, TRACT, ConsistencyDistillation):
            with pytest.raises(LitGenError, match=message):
                cls(teacher=str(mlp_teacher), lora=spec)
    # Through the CLI: one line on stderr, exit status 2, before any step.
    with pytest.raises(SystemExit) as info:
        run_cli("fit", "-c", REPO / "recipes/toy2d/fdistill.yaml", "--model.init_args.teacher", mlp_teacher,
                "--model.init_args.lora", "{targets: [nope]}", "--trainer.max_steps", 1)  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lora target 'nope' matches no" in err


def test_default_targets_per_network_and_scm(mlp_teacher: Path) -> None:
    from lit_gen.methods.scm import SCM
    from lit_gen.nets import DiT
    from lit_gen.nets.lora import resolve

    dit = DiT(img_resolution=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    modules = resolve({}, dit)["modules"]
    assert "blocks.0.attn.qkv" in modules and "blocks.1.mlp.fc2" in modules and "blocks.0.adaLN_modulation.1" in modules
    assert not any(m.startswith(("x_embedder", "t_embedder", "final")) for m in modules)
    unet = UNet(img_resolution=8, in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1)
    modules = resolve({"rank": 4}, unet)["modules"]
    assert {"enc.0.conv0", "enc.0.affine", "mid.0.qkv", "mid.0.proj"} <= set(modules)
    assert not any(m in ("conv_in", "out_conv", "map_layer0") for m in modules)
    # sCM's tangent (a JVP through the adapted layers) reaches only the adapters.
    method = SCM(teacher=str(mlp_teacher), lora={"rank": 2})
    randomize_adapters(method.net)
    method.scm_loss(torch.randn(8, 2), None).mean().backward()
    for name, p in method.net.named_parameters():
        assert (p.grad is not None) == is_adapter(name) == p.requires_grad, name
