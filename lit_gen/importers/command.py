"""``lit-gen import SRC --out TEACHER.safetensors [--format auto|diffusers|edm|edm2|dit] [--check]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lit_gen.errors import LitGenError

FORMATS: dict[str, str] = {
    "auto": "a folder is diffusers, a .pkl is edm or edm2 (by its network's class), a .pt is dit",
    "diffusers": "a diffusers pipeline folder (model_index.json) or a model folder + scheduler config",
    "edm": "an NVlabs EDM network-snapshot .pkl (DDPM++ nets), read without running the pickle",
    "edm2": "an NVlabs EDM2 .pkl (training snapshot or post-hoc EMA reconstruction; --vae for ImageNet-512 latents), "
    "onto nets.edm2.EDM2UNet, read without running the pickle",
    "dit": "a facebookresearch DiT .pt state dict (--arch, --vae), onto diffusers' DiTTransformer2DModel",
}


def detect_format(src: Path) -> str:
    if src.is_dir():
        return "diffusers"
    if src.suffix == ".pkl":
        return "pkl"  # edm or edm2: told by the class of the snapshot's 'ema' network
    if src.suffix in (".pt", ".pth"):
        return "dit"
    raise LitGenError(
        f"cannot tell the format of {src}; pass --format ({', '.join(f for f in FORMATS if f != 'auto')})"
    )


def run_import(
    src: str | Path,
    out: str | Path,
    fmt: str = "auto",
    check: bool = False,
    param: str = "native",
    arch: str | None = None,
    vae: str | Path | None = None,
    heads: int | None = None,
) -> dict[str, Any]:
    """Import ``src`` into ``out``; with ``check`` also write the conformance report beside it (``OUT.check.json``)
    a grid of samples at the teacher's default sampler (``OUT.samples.png``), and fail when the imported denoiser
    differs from the source beyond round-off."""
    src = Path(src)
    if fmt not in FORMATS:
        raise LitGenError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not src.exists():
        raise LitGenError(f"{src} does not exist")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "diffusers":
        from lit_gen.importers import diffusers as importer

        report = importer.import_diffusers(src, out, param)
    elif fmt in ("edm", "edm2", "pkl"):
        from lit_gen.importers import edm_pickle as importer  # type: ignore[no-redef]

        top = importer.read_edm_pickle(src, "EDM2" if fmt == "edm2" else "EDM")
        if fmt == "pkl":
            fmt = "edm2" if top["ema"].class_name == importer.EDM2_PRECOND else "edm"
        if fmt == "edm2":
            report = importer.import_edm2(src, out, vae, top)
        else:
            if vae is not None:
                raise LitGenError(f"{src} is an EDM pixel snapshot; --vae is for DiT and EDM2 latent teachers")
            report = importer.import_edm(src, out, top)
        del top
    else:
        from lit_gen.importers import dit as importer  # type: ignore[no-redef]

        report = importer.import_dit(src, out, arch, vae, heads, param)
    if check:
        if fmt == "dit":
            result = importer.conformance(out, src, vae)
        elif fmt == "edm2":
            result = importer.conformance_edm2(out, src, vae)  # type: ignore[attr-defined]
        else:
            result = importer.conformance(out, src)
        Path(str(out) + ".check.json").write_text(json.dumps(result, indent=2) + "\n")
        result["samples"] = str(_sample_grid(out))
        report["check"] = result
        if not result.get("faithful", True):
            raise LitGenError(f"the imported teacher differs from {src}: {json.dumps(result)}")
    return report


def _sample_grid(out: str | Path, n: int = 16, steps: int = 10) -> Path:
    """A grid of ``n`` samples of the imported teacher at its default sampler, ``OUT.samples.png``."""
    from lit_gen.export import load_model
    from lit_gen.viz import samples_picture, save_png

    model = load_model(out)
    samples = model.sample(n, steps=steps)
    return save_png(samples_picture(samples, model.data_info["kind"]), str(out) + ".samples.png")


def _cmd_import(ns: argparse.Namespace) -> None:
    report = run_import(ns.src, ns.out, ns.format, ns.check, ns.param, ns.arch, ns.vae, ns.heads)
    print(
        f"imported {ns.src} ({report.get('model_class', '')}, {report['parameters']:,} parameters) to {ns.out} "
        f"in {report['seconds']:.1f}s"
    )
    if "check" in report:
        print(json.dumps(report["check"], indent=2))


def add_parser(sub: Any) -> None:
    """The ``import`` verb on the tool parser's sub-parsers."""
    p = sub.add_parser(
        "import", help="a public teacher (diffusers folder, EDM/EDM2 .pkl, DiT .pt) -> a lit_gen .safetensors"
    )
    p.add_argument("src", help="diffusers pipeline/model folder, an EDM/EDM2 network-snapshot .pkl, or a DiT .pt")
    p.add_argument("--out", required=True, help="TEACHER.safetensors")
    p.add_argument("--format", default="auto", help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument(
        "--param",
        default="native",
        help="diffusers only: native (the teacher's own timestep table; default) or edm (the same denoiser behind "
        "EDM preconditioning, for consistency distillation)",
    )
    p.add_argument("--check", action="store_true", help="compare with the source and write OUT.check.json")
    p.add_argument("--arch", default=None, help="dit only: the model size, DiT-XL/2 ... DiT-S/8 (DiT's Table 1)")
    p.add_argument("--heads", type=int, default=None, help="dit only: attention heads of a size not in the table")
    p.add_argument(
        "--vae",
        default=None,
        help="dit and edm2 (ImageNet-512) only: the AutoencoderKL folder of its latents (DiT: sd-vae-ft-ema, EDM2: "
        "sd-vae-ft-mse)",
    )
    p.set_defaults(func=_cmd_import)
