"""How fast does a w-conditioned student learn w? (issue 18) Meng et al. 2023's stage one on the digits teacher.

A copy of the teacher with a zero-initialised w embedding (``lit_gen.nets.embed.GuidanceEmbedding``) regresses onto
the classifier-free guided teacher x̂_∅ + w (x̂_c − x̂_∅), w ~ U[1, 4] per sample, σ from the teacher's training
distribution (``DistillationMethod.stage_one_loss``'s objective, Adam). Every 100 steps, on fixed noisy digits at
σ ∈ {0.2, 1, 5, 80}: the student's *response* (RMS change of x̂ between w = 1 and w = 4, divided by the teacher's)
and its relative error at w = 4 (RMS distance to the guided teacher, divided by the teacher's w = 1 → 4 change).

    python benchmarks/guidance_stage_one.py --teacher runs/digits/teacher/checkpoints/last.ckpt --steps 300
    python benchmarks/guidance_stage_one.py ... --grid noise      # the noise embedding's frequency grid (1 … 1e-4)
    python benchmarks/guidance_stage_one.py ... --embed-lr-scale 10
    python benchmarks/guidance_stage_one.py ... --guide runs/digits/teacher_guide/checkpoints/last.ckpt  # autoguided

Prints one line per checkpoint of the probe. Not a test: no assertions, no timing claims.
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_gen.data.builtin import load_digits
from lit_gen.diffusion import guide
from lit_gen.diffusion.guidance import bind_guidance
from lit_gen.methods.distill import load_teacher, trainable_copy, with_guidance_embed
from lit_gen.nets.embed import GuidanceEmbedding

SIGMAS = (0.2, 1.0, 5.0, 80.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a class-conditional digits teacher (CFG label dropout)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--embed-lr-scale", type=float, default=1.0, help="learning-rate factor of the w embedding")
    parser.add_argument(
        "--grid",
        choices=("guidance", "noise"),
        default="guidance",
        help="w features: lit_gen's guidance grid (3 … 0.03 rad per unit w) or the noise grid",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--guide", default=None, help="a guiding model: autoguidance D_bad + w (D − D_bad) instead of CFG"
    )
    ns = parser.parse_args()
    torch.set_num_threads(1)
    if ns.grid == "noise":  # the grid GuidanceEmbedding used before issue 18's fix
        GuidanceEmbedding.W_SCALE, GuidanceEmbedding.W_MAX_POSITIONS = 1.0, 10000
    torch.manual_seed(0)
    teacher = load_teacher(ns.teacher)
    param, tnet = teacher.param, teacher.net
    null_class = int(tnet.init_args["num_classes"])
    student = with_guidance_embed(trainable_copy(tnet, 0.0))
    bad = load_teacher(ns.guide) if ns.guide else None
    images, labels = load_digits()
    data, classes = torch.tensor(images, dtype=torch.float32) / 127.5 - 1, torch.tensor(labels)
    embed = [p for n, p in student.named_parameters() if n.startswith("map_guide.")]
    rest = [p for n, p in student.named_parameters() if not n.startswith("map_guide.")]
    opt = torch.optim.Adam([{"params": rest}, {"params": embed, "lr": ns.lr * ns.embed_lr_scale}], lr=ns.lr)

    def guided(x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if bad is not None:  # Karras et al. 2024, eq. 1
            return guide(param.denoise(tnet, x, sigma, label), bad.param.denoise(bad.net, x, sigma, label), w)
        both = param.denoise(
            tnet, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([label, torch.full_like(label, null_class)])
        )
        cond, uncond = both.chunk(2)
        return guide(cond, uncond, w)

    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, len(data), (256,), generator=gen)
    y0, l0 = data[rows], classes[rows]
    probe = {s: y0 + s * torch.randn(y0.shape, generator=gen) for s in SIGMAS}

    @torch.no_grad()
    def measure() -> str:
        out = []
        for s, x in probe.items():
            sig, one, four = torch.full((len(x),), s), torch.ones(len(x)), torch.full((len(x),), 4.0)
            t1, t4 = guided(x, sig, l0, one), guided(x, sig, l0, four)
            s1 = param.denoise(bind_guidance(student, one), x, sig, l0)
            s4 = param.denoise(bind_guidance(student, four), x, sig, l0)
            spread = (t4 - t1).pow(2).mean()
            out.append(
                f"σ={s:g}: response {((s4 - s1).pow(2).mean() / spread).sqrt():.2f} "
                f"error {((s4 - t4).pow(2).mean() / spread).sqrt():.2f}"
            )
        return " | ".join(out)

    print(
        f"{'autoguidance' if bad else 'CFG'}, grid {ns.grid}, embed lr x{ns.embed_lr_scale:g}; step 0: {measure()}",
        flush=True,
    )
    start = time.time()
    for step in range(1, ns.steps + 1):
        rows = torch.randint(0, len(data), (ns.batch,))
        y, label = data[rows], classes[rows]
        sigma = param.sample_sigma(ns.batch)
        w = 1 + 3 * torch.rand(ns.batch)
        x = y + sigma.view(-1, 1, 1, 1) * torch.randn_like(y)
        with torch.no_grad():
            target = guided(x, sigma, label, w)
        x_hat = param.denoise(bind_guidance(student, w), x, sigma, label)
        loss = (param.loss_weight(sigma).view(-1, 1, 1, 1) * (x_hat - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f} {measure()} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
