"""Where along t does a toy sCD student fail? One-step quality of f(x_t, t) at fixed t (issue 19 diagnosis).

    python benchmarks/toy2d_scm_diagnose.py CKPT [CKPT ...] [--teacher-root runs/bench/toy2d_teacher] [--n 4096]

For t from 0.3 to t_max = arctan(80/0.5): x_t = cos t · y + sin t · z with y from the true held-out mixture (in the
shards' normalised units) and z ~ N(0, σ_d² I); scores (mode-weight TV / off-mode / modes covered, as
benchmarks/toy2d_scm_meanflow.py) of (a) the exact PF-ODE solution of the mixture from (x_t, t) — the ideal
consistency function, (b) the teacher's PF-ODE solution (Heun, 64 steps), (c) the teacher's denoiser x̂ (where the
sCD student starts), (d) each student's f(x_t, t), with its mean distance to (b).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from lit_gen.data.builtin import TOY2D, mixture_metrics
from lit_gen.data.info import denormalize
from lit_gen.diffusion.grids import karras_sigmas
from lit_gen.diffusion.samplers import sample_heun
from lit_gen.export import load_model

F64 = torch.float64
TIMES = (0.3, 0.6, 0.9, 1.1, 1.3, 1.45, 1.52, math.atan2(80.0, 0.5))


def exact_denoiser(spec, shift: torch.Tensor, scale: float):
    """The mixture's exact D(x; σ) in normalised units (Gaussian closed form, ALGORITHMS.md §1.1, mixed)."""
    means = (torch.tensor(spec.means, dtype=F64) - shift) / scale
    var0 = (torch.tensor(spec.stds, dtype=F64) / scale) ** 2
    logw = torch.log(torch.tensor(spec.weights, dtype=F64))

    def denoise(x, sigma, label=None, **_):
        x = x.to(F64)
        var = var0[None] + torch.as_tensor(sigma, dtype=F64).reshape(-1, 1).expand(x.shape[0], 1) ** 2
        post = torch.softmax(logw[None] - ((x[:, None] - means[None]) ** 2).sum(-1) / (2 * var) - var.log(), dim=1)
        return (post[..., None] * (means[None] + (var0[None] / var)[..., None] * (x[:, None] - means[None]))).sum(1)

    return denoise


def ode_to_zero(den, x, sigma, dtype=F64, steps=64):
    grid = karras_sigmas(steps, 0.002, sigma, 7.0, dtype=dtype)
    with torch.no_grad():
        return sample_heun(lambda a, b, c=None: den(a.to(dtype), b.to(dtype), c).to(dtype), x.to(dtype), grid).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="*")
    parser.add_argument("--mixture", default="gmm5_heldout")
    parser.add_argument("--teacher-root", default="runs/bench/toy2d_teacher")
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = TOY2D[args.mixture]
    teacher = load_model(Path(args.teacher_root) / args.mixture / "checkpoints" / "last.ckpt")
    info = teacher.data_info
    shift, scale = torch.tensor(info["normalize"]["shift"], dtype=F64), float(info["normalize"]["scale"])
    exact = exact_denoiser(spec, shift, scale)
    y = (torch.tensor(spec.sample(args.n, 3)[0]) - shift) / scale
    z = 0.5 * torch.randn(args.n, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    students = [load_model(p) for p in args.ckpts]

    def score(x):
        m = mixture_metrics(denormalize(x.double(), info).numpy(), spec)
        return f"{m['mode_tv']:.3f} / {100 * m['off_mode']:.1f} % / {m['modes_covered']}"

    head = "| t | σ | exact ODE | teacher ODE | teacher x̂ | " + " | ".join(f"student {i}" for i in range(len(students)))
    print(head + " |\n|" + " --- |" * (5 + len(students)))
    for t in TIMES:
        sigma = 0.5 * math.tan(t)
        x = (math.cos(t) * y + math.sin(t) * z) / math.cos(t)  # EDM coordinates
        s = torch.full((args.n,), sigma)
        f_teacher = ode_to_zero(teacher.denoiser(), x, sigma, dtype=torch.float32)
        with torch.no_grad():
            x_hat = teacher.denoiser()(x.float(), s, None)
        row = [f"{t:.4f}", f"{sigma:.3g}", score(ode_to_zero(exact, x, sigma)), score(f_teacher), score(x_hat)]
        for m in students:
            with torch.no_grad():
                f = m.param.denoise(m.net.eval(), x.float(), s, None).double()
            row.append(f"{score(f)} (err {float((f - f_teacher).norm(dim=1).mean()):.3f})")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
