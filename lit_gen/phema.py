"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" — EDM2,
Sec. 3 and App. C): track two power-function EMA profiles during training, save both every K steps, and after
training reconstruct the EMA of any other width σ_rel as a least-squares combination of the snapshots.

Power-function EMA (EDM2 eq. 3 and App. C.1): the average at step t weights step τ ∝ τ^γ on [0, t], obtained by the
update θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ+1) (t counts optimizer steps from 1; β_1 = 0, so
the first update copies). Its relative width is σ_rel = √((γ+1) / ((γ+2)² (γ+3))) (EDM2 eq. 4); EDM2 tracks σ_rel
0.05 and 0.10.

Reconstruction (EDM2 App. C.3, the reference ``solve_posthoc_coefficients``): a snapshot i saved at step t_i with
exponent γ_i is the profile p_i(τ) = (γ_i+1) τ^γ_i / t_i^(γ_i+1) on [0, t_i]. The wanted profile q (γ, at step t) is
approximated by Σ_i x_i p_i minimising ∫ (q − Σ x_i p_i)²: the normal equations A x = b with A_ij = ⟨p_i, p_j⟩ and
b_i = ⟨p_i, q⟩, whose inner products have the closed form ``power_correlation`` (no quadrature). The weights are
normalised to sum to 1 (EDM2 does the same), and the reconstructed network is Σ_i x_i θ̂_i.

This module is pure maths plus the snapshot files; ``callbacks.phema.PostHocEMA`` writes the snapshots during
``lit-gen fit`` and ``lit-gen phema RUN_DIR --sigma-rel ... --out DIR`` writes one model file per σ_rel.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_gen.errors import LitGenError

SNAPSHOT_DIR = "phema"
SNAPSHOT_PATTERN = re.compile(r"^phema-(\d{8})\.safetensors$")


# ------------------------------------------------------------------------------------------------------ the maths
def sigma_rel_from_gamma(gamma: float | np.ndarray) -> float | np.ndarray:
    """σ_rel = √((γ+1) / ((γ+2)² (γ+3))) (EDM2 eq. 4)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ of a relative width σ_rel: eq. 4 solved for γ is the cubic γ³ + 7γ² + (16 − s)γ + (12 − s) = 0
    with s = σ_rel^{-2}; its largest real root (EDM2's ``std_to_exp``). Needs 0 < σ_rel < √(1/12)
    (σ_rel → √(1/12) ≈ 0.289 as γ → 0, the uniform average)."""
    if not 0 < sigma_rel < math.sqrt(1 / 12):
        raise LitGenError(f"sigma_rel must be in (0, {math.sqrt(1 / 12):.4f}), got {sigma_rel}")
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def power_beta(step: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ+1) of the t-th update (t from 1; EDM2 App. C.1, ``power_function_beta``)."""
    if step < 1:
        raise ValueError(f"power-function EMA steps count from 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def power_correlation(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a p_b dτ of two power-function profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (EDM2's
    ``power_function_correlation``): with t_a ≤ t_b it is (γ_a+1)(γ_b+1) (t_a/t_b)^γ_b / ((γ_a+γ_b+1) t_b)."""
    t_a, gamma_a, t_b, gamma_b = (np.float64(v) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    num = (gamma_a + 1) * (gamma_b + 1) * ratio**exponent
    den = (gamma_a + gamma_b + 1) * np.maximum(t_a, t_b)
    return num / den


def solve_coefficients(
    in_steps: Sequence[float], in_gammas: Sequence[float], out_step: float, out_gamma: float
) -> np.ndarray:
    """Weights x of the snapshots (steps ``in_steps``, exponents ``in_gammas``) whose combination Σ x_i p_i is the
    least-squares fit of the profile (``out_step``, ``out_gamma``): A x = b (EDM2 App. C.3), normalised to sum 1."""
    t = np.float64(in_steps).reshape(-1)
    g = np.float64(in_gammas).reshape(-1)
    if t.size == 0:
        raise LitGenError("no post-hoc EMA snapshots to reconstruct from")
    a = power_correlation(t[:, None], g[:, None], t[None, :], g[None, :])
    b = power_correlation(t, g, np.float64(out_step), np.float64(out_gamma))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


# -------------------------------------------------------------------------------------------------- snapshot files
def snapshot_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"phema-{int(step):08d}.safetensors"


def write_snapshot(folder: str | Path, step: int, profiles: dict[float, dict[str, torch.Tensor]], extra: dict) -> Path:
    """One file per snapshot step: every tracked profile's weights under ``"<i>/<name>"`` (i = the profile's index in
    ``metadata.sigma_rels``), written atomically (a partial file never carries the final name)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sigma_rels = sorted(profiles)
    tensors = {
        f"{i}/{name}": value.detach().cpu().contiguous()
        for i, s in enumerate(sigma_rels)
        for name, value in profiles[s].items()
    }
    meta = {"step": int(step), "sigma_rels": sigma_rels, "gammas": [gamma_from_sigma_rel(s) for s in sigma_rels]}
    out = snapshot_path(folder, step)
    tmp = out.with_name(out.name + ".partial")
    save_file(tensors, str(tmp), metadata={"lit_gen_phema": json.dumps({**meta, **extra})})
    tmp.replace(out)
    return out


def read_snapshots(folder: str | Path) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Every snapshot in ``folder`` (sorted by step) as (metadata, tensors); one line for a missing or bad folder."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = (
        sorted(p for p in folder.glob("phema-*.safetensors") if SNAPSHOT_PATTERN.match(p.name))
        if folder.is_dir()
        else []
    )
    if not files:
        raise LitGenError(
            f"no post-hoc EMA snapshots in {folder} (train with the callbacks.phema.PostHocEMA callback in the recipe)"
        )
    out = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["lit_gen_phema"])
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no iter
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise LitGenError(f"cannot read the post-hoc EMA snapshot {path}: {err}") from None
        out.append((meta, tensors))
    return out


def reconstruct(
    snapshots: list[tuple[dict[str, Any], dict[str, torch.Tensor]]], sigma_rel: float, at_step: int | None = None
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The network weights of the power-function EMA of width ``sigma_rel`` at ``at_step`` (default: the last
    snapshot), as Σ x_i θ̂_i over every (snapshot, profile) pair; returns (weights, x). Integer tensors (buffers that
    are not averaged) come from the last snapshot."""
    gamma = gamma_from_sigma_rel(sigma_rel)
    steps, gammas, sources = [], [], []
    for meta, tensors in snapshots:
        for i, g in enumerate(meta["gammas"]):
            steps.append(meta["step"])
            gammas.append(g)
            sources.append((tensors, f"{i}/"))
    at_step = int(at_step if at_step is not None else max(steps))
    x = solve_coefficients(steps, gammas, at_step, gamma)
    last_tensors, last_prefix = sources[-1]
    names = [k[len(last_prefix) :] for k in last_tensors if k.startswith(last_prefix)]
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        ref = last_tensors[last_prefix + name]
        if not ref.is_floating_point():
            weights[name] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for coef, (tensors, prefix) in zip(x, sources, strict=True):
            acc += float(coef) * tensors[prefix + name].to(torch.float64)
        weights[name] = acc.to(ref.dtype)
    return weights, x


# ------------------------------------------------------------------------------------------------ lit-gen phema
def run_phema(
    run_dir: str | Path,
    sigma_rels: Sequence[float],
    out: str | Path,
    ckpt: str | Path | None = None,
    at_step: int | None = None,
) -> list[tuple[float, Path]]:
    """Reconstruct the EMA of each width in ``sigma_rels`` from ``RUN_DIR/phema/`` and write one self-describing model
    file per width, ``OUT/phema-<σ_rel>.safetensors`` (what ``lit-gen sample``/``eval`` read). The description
    (network, parameterisation, data, sampling defaults) comes from ``ckpt`` (default ``RUN_DIR/checkpoints/
    last.ckpt``)."""
    from safetensors.torch import save_file

    from lit_gen.export import read_model_file

    run_dir = Path(run_dir)
    ckpt = Path(ckpt) if ckpt is not None else run_dir / "checkpoints" / "last.ckpt"
    snapshots = read_snapshots(run_dir / SNAPSHOT_DIR)
    description, raw = read_model_file(ckpt, "raw")
    written = []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for sigma_rel in sigma_rels:
        weights, x = reconstruct(snapshots, float(sigma_rel), at_step)
        if set(weights) != set(raw):
            missing = sorted(set(raw) ^ set(weights))[:1]
            raise LitGenError(f"the snapshots in {run_dir} do not hold the network of {ckpt} (e.g. {missing})")
        meta = dict(description)
        steps = [m["step"] for m, _ in snapshots]
        meta["weights"] = f"phema sigma_rel={float(sigma_rel):g}"
        meta["phema"] = {"sigma_rel": float(sigma_rel), "at_step": int(at_step or max(steps)), "snapshots": len(x)}
        path = out / f"phema-{float(sigma_rel):.3f}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata={"lit_gen": json.dumps(meta)})
        tmp.replace(path)
        written.append((float(sigma_rel), path))
    return written
