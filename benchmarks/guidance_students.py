"""Guidance-conditioned students on digits (issue 18): does one w-conditioned 1-step student track its teacher
across w, for classifier-free guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024)?

For each w: the teacher at 35 NFE (Heun, 18 steps) under CFG and under autoguidance, and each w-conditioned student
(1 step) fed the same w — FD on the digits classifier's features and C2ST against the held-out digits,
precision/recall, and the classifier's accuracy on the labels the samples were drawn for. Then, per student, the
FD between its samples at w and the teacher's samples at every w' (same guidance kind): the student tracks the
teacher when each row's minimum is on the diagonal.

    python benchmarks/guidance_students.py --teacher runs/digits/teacher/checkpoints/last.ckpt \
        --guide runs/digits/teacher_guide/checkpoints/last.ckpt --ref runs/data/digits/val \
        --student cfg=runs/digits/tract_wcond_cfg/checkpoints/last.ckpt \
        --student ag=runs/digits/tract_wcond_ag/checkpoints/last.ckpt --n 1000

Prints markdown tables (and ``--out FILE.json`` the numbers). Not a test: no assertions, no timing claims.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_gen.eval.digits_classifier import accuracy, load_digits_classifier
from lit_gen.eval.metrics import frechet_distance
from lit_gen.eval.runner import Evaluator, to_pixels
from lit_gen.export import LoadedModel, load_model


def labelled_samples(model: LoadedModel, n: int, steps: int, w: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples, ``n/10`` per class (so the label accuracy is measurable), and their labels."""
    per = n // 10
    xs, labels = [], []
    for label in range(10):
        xs.append(model.sample(per, steps=steps, seed=seed + label, label=label, guidance=w))
        labels.append(torch.full((per,), label, dtype=torch.long))
    return torch.cat(xs), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--guide", required=True, help="the guiding (bad) model for the autoguided teacher")
    parser.add_argument("--ref", required=True, help="held-out digits shards")
    parser.add_argument("--student", action="append", default=[], help="KIND=PATH, KIND cfg or ag")
    parser.add_argument("--w", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--teacher-steps", type=int, default=18)
    parser.add_argument("--metric", nargs="+", default=["fd", "c2st", "pr"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default="TRACT", help="the students' name in the tables (and the cache)")
    parser.add_argument("--cache", default=None, help="folder keeping each (model, w) sample set, reused if present")
    ns = parser.parse_args()

    torch.set_num_threads(1)
    start = time.time()
    evaluator = Evaluator(ns.ref, ns.metric)
    classifier = load_digits_classifier()
    teacher = load_model(ns.teacher)
    guide = load_model(ns.guide)
    students = {kind: load_model(path) for kind, path in (s.split("=", 1) for s in ns.student)}
    rows, pixels = [], {}
    for kind in ("cfg", "ag"):
        teacher.guide = guide if kind == "ag" else None  # the autoguided teacher: D_bad + w (D − D_bad)
        for w in ns.w:
            models = [(f"teacher ({kind})", teacher, ns.teacher_steps)]
            if kind in students:
                models.append((f"w-cond {ns.tag} student ({kind})", students[kind], 1))
            for name, model, steps in models:
                cached = Path(ns.cache) / f"{name.replace(' ', '_')}_w{w:g}_n{ns.n}.pt" if ns.cache else None
                if cached is not None and cached.exists():
                    x, labels = torch.load(cached, weights_only=True)
                else:
                    x, labels = labelled_samples(model, ns.n, steps, w, seed=0)
                    if cached is not None:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        torch.save((x, labels), cached)
                px = to_pixels(x)
                pixels[(name, w)] = px
                row = {"model": name, "w": w, "nfe": 2 * steps - 1 if "teacher" in name else 1}
                row.update(evaluator.score(x))
                row["label_acc"] = accuracy(classifier, px, labels)
                rows.append(row)
                print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k not in ("model", "w", "nfe")]
    print("\n| model | w | NFE | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for row in rows:
        cells = " | ".join(f"{row[k]:.4g}" for k in keys)
        print(f"| {row['model']} | {row['w']:g} | {row['nfe']} | {cells} |")

    cross = {}
    for kind in students:
        name, tname = f"w-cond {ns.tag} student ({kind})", f"teacher ({kind})"
        print(f"\nFD(student at w, teacher at w'), {kind}: rows w, columns w'; * = row minimum")
        print("| w \\ w' | " + " | ".join(f"{w:g}" for w in ns.w) + " |")
        print("|---|" + "---|" * len(ns.w))
        for w in ns.w:
            values = [frechet_distance(pixels[(tname, v)], pixels[(name, w)], classifier) for v in ns.w]
            cross[f"{kind} {w:g}"] = values
            best = min(range(len(values)), key=values.__getitem__)
            cells = " | ".join(f"{v:.3g}{'*' if i == best else ''}" for i, v in enumerate(values))
            print(f"| {w:g} | {cells} |")
        # the teachers' own spread: FD between the teacher at w and at w' (what "tracking" must resolve)
        print(f"\nFD(teacher at w, teacher at w'), {kind}:")
        for w in ns.w:
            values = [frechet_distance(pixels[(tname, v)], pixels[(tname, w)], classifier) for v in ns.w]
            print(f"| {w:g} | " + " | ".join(f"{v:.3g}" for v in values) + " |")
    print(f"\n{time.time() - start:.0f} s")
    if ns.out:
        Path(ns.out).write_text(json.dumps({"rows": rows, "cross": cross, "w": ns.w}, indent=1))


if __name__ == "__main__":
    main()
