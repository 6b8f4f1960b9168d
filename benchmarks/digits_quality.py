"""Sample quality on built-in digits: Fréchet distance in the digits classifier's feature space (``lit_gen.eval``).

    python benchmarks/digits_quality.py [--teacher CKPT] [--student CKPT ...] [--student-steps 1 2] [--seeds 0 1 2]

Reference = the held-out part of lit_gen's fixed digits split (360 images, ``lit_gen.eval.digits_classifier.
digits_split``), written once as shards under ``--data``. Every model draws as many samples as the train part holds
(1437), so the floor row — the real train images scored the same way — is the FD that perfect samples would get at this
sample size. Teacher: Euler at 1/2/4/8 steps (NFE = steps) and Heun at 18 steps (35 NFE, EDM's default). Students
(any ``lit-gen fit`` checkpoint or exported file, e.g. TRACT, consistency, f-distill) are sampled with their own
sampler and σ grid at ``--student-steps``. ``FD ratio`` = FD / FD of the teacher at 35 NFE. Each number is the mean
over ``--seeds`` (sampling noise), with the spread (max - min) in brackets when there are several.

Caveat: the digits teacher of ``recipes/digits/teacher.yaml`` trains on all 1797 digits, the reference included.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_gen.data.shards import write_shards
from lit_gen.eval import Evaluator
from lit_gen.eval.digits_classifier import digits_split

TEACHER_BUDGETS = [("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("heun", 18)]


def split_shards(root: Path) -> tuple[Path, Path]:
    """Shards of the fixed train/test digits split (written once; ``lit-gen shards`` from .npz arrays)."""
    train_x, train_y, test_x, test_y = digits_split()
    out = []
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        folder = root / name
        if not (folder / "dataset.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            np.savez(root / f"{name}.npz", x=x, y=y)
            write_shards(str(root / f"{name}.npz"), folder)
        out.append(folder)
    return out[0], out[1]


def mean_spread(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.max(values) - np.min(values))


def cell(values: list[float], digits: int = 3) -> str:
    mean, spread = mean_spread(values)
    if math.isnan(mean):
        return "nan"
    return f"{mean:.{digits}f}" + (f" ({spread:.{digits}f})" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="runs/bench/digits_teacher5k/checkpoints/last.ckpt")
    parser.add_argument("--student", nargs="*", default=[], help="student checkpoints / exported files")
    parser.add_argument("--student-steps", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--data", default="runs/bench/digits_eval", help="where the split shards are written")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    train, test = split_shards(Path(args.data))
    evaluator = Evaluator(test, ["fd", "pr", "is"], device=args.device)
    n = len(digits_split()[0])
    real = torch.from_numpy(digits_split()[0]).float()
    floor = evaluator.score(real)

    # (label, path, [(sampler or None, steps)])
    models: list[tuple[str, str, list[tuple[str | None, int]]]] = [("teacher", args.teacher, TEACHER_BUDGETS)]
    models += [(Path(s).parent.parent.name or s, s, [(None, k) for k in args.student_steps]) for s in args.student]
    results: list[dict[str, Any]] = []
    for label, path, budgets in models:
        for sampler, steps in budgets:
            runs, seconds = [], []
            for seed in args.seeds:
                start = time.time()
                runs.append(evaluator.evaluate(path, steps=[steps], n=n, seed=seed, sampler=sampler)[0])
                seconds.append(time.time() - start)
            results.append({"label": label, "row": runs[0], "runs": runs, "seconds": float(np.mean(seconds))})

    reference = next(r for r in results if r["label"] == "teacher" and r["row"]["nfe"] == 35)
    fd35 = float(np.mean([r["fd"] for r in reference["runs"]]))
    print(
        f"Digits quality — reference: {test} ({len(evaluator.reference)} held-out images), n = {n} samples per row, "
        f"seeds {args.seeds}; {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| model | sampler | steps | NFE | FD (digits) | FD ratio vs teacher@35 | precision | recall | IS | s/seed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| real train split (floor) | - | - | - | {floor['fd']:.3f} | {floor['fd'] / fd35:.3f} | "
        f"{floor['precision']:.3f} | {floor['recall']:.3f} | {floor['is']:.2f} | - |"
    )
    for r in results:
        row, runs = r["row"], r["runs"]
        fds = [x["fd"] for x in runs]
        print(
            f"| {r['label']} | {row['sampler']} | {row['steps']} | {row['nfe']} | {cell(fds)} | "
            f"{float(np.mean(fds)) / fd35:.2f} | {cell([x['precision'] for x in runs])} | "
            f"{cell([x['recall'] for x in runs])} | {cell([x['is'] for x in runs], 2)} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
