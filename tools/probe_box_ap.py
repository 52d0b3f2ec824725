"""Quick probe of a Shapes model's layout following: box AP50 of the box and mask settings on the smoke report's
first N val layouts (the report's own generation parameters: 25 PLMS steps, guidance 3, MIS 0.36), through the same
library calls as ``notebooks/10_location_formats.ipynb``. For comparing training recipes; not a report number.

    python tools/probe_box_ap.py MODEL_DIR OUT_DIR [--n 16] [--seeds 0] [--settings box,mask] [--steps 25]
        [--guidance 3] [--json FILE]

Generated images go under OUT_DIR (a rerun reuses them and only scores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from instdiff_lib.evaluation import experiments as protocol
from instdiff_lib.evaluation.world import shapes_world


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--settings", default="box,mask")
    ap.add_argument("--steps", default="25", help="PLMS step counts, comma-separated (each x each guidance)")
    ap.add_argument("--guidance", default="3", help="guidance scales, comma-separated")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    world = shapes_world(n_val=200, model=a.model)
    grid = [(int(st), float(g)) for st in a.steps.split(",") for g in a.guidance.split(",")]
    variants = [protocol.Variant(s if grid == [(25, 3.0)] else f"{s} steps={st} guidance={g:g}", s, steps=st,
                                 guidance=g, mis=0.36) for s in a.settings.split(",") for st, g in grid]
    t0 = time.perf_counter()
    generated = protocol.generate_runs(world, variants, seeds, a.out, a.n)
    records = protocol.score_runs(world, generated, a.n, fid=False)
    res: dict[str, list] = {}
    for r in records:
        res.setdefault(r.variant.name, []).append(
            {"seed": r.seed, **{k: round(r.metrics[k], 4) for k in ("box_AP50", "box_AP", "mask_AP50")}})
    out = {"model": a.model, "n_images": a.n, "seeds": seeds, "results": res,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
