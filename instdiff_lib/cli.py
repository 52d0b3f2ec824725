"""``instdiff`` command line: generate, convert, download, bench, report, rehearse.

    instdiff generate layouts/boxes_kitchen_animals.json --out outputs/demo --model tiny --steps 20
    instdiff download --all                 # every asset of the full profile (README, "Run the full protocol")
    instdiff convert weights/instancediffusion_sd15.pth --out weights/instdiff-sd15 --dtype fp16
    instdiff rehearse                       # the full profile on CPU with synthetic assets (make rehearsal)
    instdiff bench --config tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MAX_BATCH_HELP = ("UNet samples per call (both guidance halves of every MIS branch form one batch); default: what fits "
                  "in the free GPU memory, measured once (CPU: all at once)")


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} requested but CUDA is not available on this machine")
    return name


def cmd_generate(args: argparse.Namespace) -> int:
    from instdiff_lib.sampling.generate import generate_from_layout

    paths = generate_from_layout(
        args.layout, args.out, model=args.model, seed=args.seed, steps=args.steps, guidance=args.guidance,
        alpha=args.alpha, mis=args.mis, num_images=args.num_images, device=_device(args.device),
        dtype=_dtype(args.dtype), drop=args.drop, negative_prompt=args.negative_prompt, truncate=args.truncate,
        refine=args.refine, overwrite=args.overwrite, verify=not args.no_verify, method=args.method,
        skip_mode=args.skip_mode, max_batch=args.max_batch)
    for p in paths:
        print(p)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from instdiff_lib.weights.checkpoint import file_sha256, load_official, save_converted

    comp = load_official(args.checkpoint, sha256=args.sha256, prefer=args.entry)
    for r in comp.reports:
        print(r)
    source = {"path": str(Path(args.checkpoint).resolve()), "sha256": args.sha256 or file_sha256(args.checkpoint),
              "entry": comp.reports[0].source}
    out = save_converted(comp, args.out, dtype=torch.float16 if args.dtype == "fp16" else torch.float32, source=source)
    print(f"wrote {out}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    if not (args.all or args.only):
        from instdiff_lib.weights.checkpoint import download_official

        print(download_official(args.out))
        return 0
    from instdiff_lib.report.assets import download

    failed = download(args.only, sources=args.sources, params_dir=args.params_dir)
    if failed:
        lines = "\n".join(f"  - {a.key}: {why}" for a, why in failed)
        print(f"error: {len(failed)} asset(s) could not be fetched:\n{lines}", file=sys.stderr)
        return 2
    print("every asset of the full profile is in place (next: instdiff convert, see README)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from instdiff_lib.bench import run_bench, run_metrics_bench

    if args.quality and not args.quality_fresh:
        from instdiff_lib.bench import format_bars, quality_bars

        bars = quality_bars(args.results)
        print(format_bars(bars))
        return 0 if all(b.passed for b in bars) else 1
    if args.quality_fresh:
        from instdiff_lib.bench import run_quality_bench

        report = run_quality_bench(n_images=args.quality_images, steps=args.steps if args.steps != 10 else 25,
                                   guidance=args.guidance, mis=args.mis)
        print(json.dumps(report, indent=2))
        for key in ("box_AP50", "color", "texture"):
            ok = report[f"{key}_pass"]
            print(f"{key:9s} {'PASS' if ok else 'FAIL'}")
        return 0
    if args.layout_batch:
        from instdiff_lib.bench import run_layout_batch_bench

        report = run_layout_batch_bench(model=args.model, layout_batch=args.layout_batch, n_layouts=args.layouts,
                                        steps=args.steps if args.steps != 10 else 25, mis=args.mis,
                                        guidance=args.guidance, device=_device(args.device))
        print(json.dumps(report, indent=2))
        print(f"{args.layout_batch} layouts per call: {report['speedup']} x the speed of one per call")
        return 0
    if args.shapes_data:
        from instdiff_lib.bench import run_shapes_data_bench

        report = run_shapes_data_bench(n_images=args.shapes_images)
        print(json.dumps(report, indent=2))
        print(f"shapes data: {report['seconds']} s for {report['n_images']} images, {report['target_ratio']} x the "
              f"{report['target_s']} s target ({'PASS' if report['target_ratio'] < 1 else 'FAIL'})")
        return 0
    if args.protocol or args.project:
        from instdiff_lib.protocol_bench import format_protocol, project_protocol, run_protocol_bench

        if args.project:
            cost = json.loads(Path(args.project).read_text())
        else:
            cost = run_protocol_bench(config=args.config or "sd15", model=args.model,
                                      device=_device(args.device), dtype=_dtype(args.dtype),
                                      steps=args.steps if args.steps != 10 else 50, mis=args.mis,
                                      images_per_setting=args.protocol_images, budget_s=args.budget)
            if args.out:  # the measurements first: the projection needs the report's packages (nbformat)
                Path(args.out).write_text(json.dumps(cost, indent=2))
        try:
            proj = project_protocol(cost, params_dir=args.params_dir, coco_root=args.coco_root)
        except ImportError as e:
            proj = None
            print(f"no projection here ({e}): run `instdiff bench --project FILE` where the report is installed")
        print(format_protocol(cost, proj))
        return 0
    if args.metrics:
        report = run_metrics_bench(n_images=args.metrics_images, yolo=args.yolo, device=_device(args.device))
        print(json.dumps(report, indent=2))
        return 0

    report = run_bench(config=args.config or "tiny", steps=args.steps, n_instances=args.instances, mis=args.mis,
                       num_images=args.num_images, device=_device(args.device), dtype=_dtype(args.dtype),
                       max_batch=args.max_batch, repeats=args.repeats)
    print(json.dumps(report, indent=2))
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    import torch

    from instdiff_lib import parity

    d = Path(args.fixture) if args.fixture else parity.parity_dir()
    parity.verify_fixture(d)
    dtype = _dtype(args.dtype)
    if dtype == torch.float32 and not args.tf32:  # TF32 convolutions/matmuls are not fp32 arithmetic
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    unet = parity.load_parity_unet(d, device=_device(args.device), dtype=dtype)
    checks = parity.forward_checks(unet, d) + parity.sampler_checks(unet, d)
    if dtype == torch.float32:
        checks += parity.block_checks(unet, d)
    for c in checks:
        print(c)
    n_bad = sum(not c.ok for c in checks)
    print(f"{len(checks) - n_bad}/{len(checks)} within the fixture's fp32 tolerances "
          f"(device {args.device}, {args.dtype}{'; half precision is not expected to meet them' if n_bad and dtype != torch.float32 else ''})")
    return 1 if n_bad and dtype == torch.float32 else 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "coco":
        from instdiff_lib.datasets.coco import download_coco

        for part, path in download_coco(args.root, parts=tuple(args.parts)).items():
            print(f"{part}: {path}")
    elif args.data_command == "resize-512":
        from instdiff_lib.datasets.coco import resize_instances

        resize_instances(args.src, args.dst, size=args.size)
        print(f"wrote {args.dst} ({args.size}x{args.size} frames)")
    elif args.data_command == "shapes":
        from instdiff_lib.datasets.shapes import make_shapes_dataset

        split = make_shapes_dataset(args.out, args.n, args.seed, size=args.size, split=args.split)
        print(f"{split.n_images} images in {split.image_dir}; annotations {split.instances_json}")
    return 0


def cmd_eval_generate(args: argparse.Namespace) -> int:
    from instdiff_lib.datasets.coco import protocol_items
    from instdiff_lib.evaluation.generation import SETTINGS, generate_eval, parse_shard
    from instdiff_lib.sampling.pipeline import InstanceDiffusionPipeline

    shard = parse_shard(args.shard)
    items = protocol_items(args.instances, args.captions, attribute=SETTINGS[args.setting]["attribute"])
    if args.limit:
        items = items[: args.limit]
    pipe = InstanceDiffusionPipeline.from_pretrained(args.model, device=_device(args.device), dtype=_dtype(args.dtype),
                                                     max_batch=args.max_batch)
    generate_eval(items, args.out, pipe, args.setting, shard=shard, base_seed=args.seed, image_format=args.format,
                  quality=args.quality, steps=args.steps, guidance=args.guidance, alpha=args.alpha, mis=args.mis,
                  layout_batch=args.layout_batch)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from instdiff_lib.extension.planner import LLMPlanner, OfflinePlanner, plan_many

    common = dict(width=args.canvas, height=args.canvas, n_instances=_instance_range(args.instances), seed=args.seed)
    if args.offline:
        planner = OfflinePlanner(**common)
    else:
        planner = LLMPlanner(args.llm_model, base_url=args.base_url, max_retries=args.max_retries,
                             temperature=args.temperature, **common)
    report = plan_many(args.prompt, planner, args.out, n_per_prompt=args.n)
    print(json.dumps({k: v for k, v in report.items() if k in ("planner", "n_layouts", "n_failed", "totals")}, indent=2,
                     default=str))
    return 0


def _instance_range(text: str):
    lo, _, hi = text.partition("-")
    return (int(lo), int(hi)) if hi else int(lo)


def cmd_eval_score(args: argparse.Namespace) -> int:
    from instdiff_lib.evaluation.scoring import score_setting, summary_lines
    from instdiff_lib.results import write_results

    clip = None
    if args.setting in ("color", "texture"):
        from instdiff_lib.evaluation.metrics.clip_metrics import load_clip

        clip = load_clip(args.clip_model, args.clip_pretrained, device=_device(args.device))
    t0 = time.perf_counter()
    result = score_setting(args.setting, instances_json=args.instances, captions_json=args.captions,
                           images_dir=args.images, real_image_dir=args.real_images, yolo=args.yolo, clip=clip,
                           fid_real_dir=args.fid_real, device=_device(args.device), batch=args.batch,
                           seed=args.seed, limit=args.limit)
    for line in summary_lines(result):
        print(line)
    if args.out:
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
        write_results(args.out, result["metrics"], params=params, n_evaluated=result["n_images"],
                      profile=args.profile, wall_time_s=round(time.perf_counter() - t0, 2),
                      extra={"source": result["source"], "timing_s": result["timing_s"],
                             "images_per_s": result["images_per_s"]})
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from instdiff_lib.evaluation.generation import IMAGE_FORMAT, JPEG_QUALITY

    p = argparse.ArgumentParser(prog="instdiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a layout JSON (official demo format)")
    g.add_argument("layout", help="layout JSON file")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--model", default=None, help="converted folder, official .pth, or preset name (random init); "
                   "default: the committed Shapes mini model (models/shapes-mini)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--alpha", type=float, default=0.8, help="fraction of steps with the fusers on")
    g.add_argument("--mis", type=float, default=0.36, help="fraction of steps of the Multi-Instance Sampler (0 = off)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    g.add_argument("--drop", default="mask", choices=["mask", "box", "point", "all"],
                   help="modality preset (official test_*.yaml): mask (default), box, point, all (scribbles)")
    g.add_argument("--method", default="plms", choices=["plms", "ddim"])
    g.add_argument("--skip-mode", default=None, choices=["scaleu", "freeu", "none"],
                   help="decoder-skip scaling: scaleu (official), freeu or none; default: the model's own")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--truncate", action="store_true", help="keep the first 30 instances instead of failing")
    g.add_argument("--refine", type=float, default=0.0, metavar="STRENGTH",
                   help="SDXL-refiner img2img pass with this strength (needs the refiner weights)")
    g.add_argument("--max-batch", type=int, default=None, help=MAX_BATCH_HELP)
    g.add_argument("--overwrite", action="store_true", help="regenerate even if the outputs exist")
    g.add_argument("--no-verify", action="store_true", help="skip sha256 checks of a converted model")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert the official .pth into a compact safetensors folder")
    c.add_argument("checkpoint")
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", choices=["fp32", "fp16"], default="fp16")
    c.add_argument("--entry", choices=["ema", "model"], default="ema", help="preferred weights entry (official: ema)")
    c.add_argument("--sha256", default=None, help="expected sha256 of the checkpoint (checked before loading)")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("download", help="fetch the full profile's assets (--all), or only the released checkpoint")
    d.add_argument("--all", action="store_true", help="every asset of the full profile, into the documented "
                   "locations (checkpoint, COCO, YOLOv8m-seg, CLIP ViT-L/14, FID Inception, the extension's detector)")
    d.add_argument("--only", nargs="+", default=None, metavar="KEY",
                   choices=["checkpoint", "coco", "yolo", "clip", "inception", "detector"], help="just these assets")
    d.add_argument("--from", dest="sources", action="append", default=[], metavar="DIR",
                   help="a folder holding copies (a Hugging Face cache, a torch hub checkpoints folder, a COCO root, "
                   "or the files themselves): they are linked into place instead of downloaded; repeatable")
    d.add_argument("--params-dir", default=None, help="read the asset locations from these params files "
                   "(default jobs/params/full)")
    d.add_argument("--out", default="weights", help="without --all/--only: where the checkpoint goes")
    d.set_defaults(func=cmd_download)

    b = sub.add_parser("bench", help="batched vs official-order sampling speed, in one process")
    b.add_argument("--config", default=None, help="model preset (random weights): tiny, sd15, ... (default: tiny; "
                                                "with --protocol sd15)")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--instances", type=int, default=4)
    b.add_argument("--mis", type=float, default=0.36)
    b.add_argument("--num-images", type=int, default=1)
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    b.add_argument("--max-batch", type=int, default=None)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--metrics", action="store_true", help="instead: scoring cost per image vs the detector's")
    b.add_argument("--metrics-images", type=int, default=200)
    b.add_argument("--yolo", default="yolov8m-seg.yaml")
    b.add_argument("--layout-batch", type=int, default=0,
                   help="instead: K layouts per pipeline call vs one per call (default model: the committed Shapes "
                        "mini; --model another), seconds per image and the ratio")
    b.add_argument("--layouts", type=int, default=16, help="with --layout-batch: layouts sampled each way")
    b.add_argument("--shapes-data", action="store_true",
                   help="instead: Shapes dataset generation time vs its target (200 images of 64 px in 5 s)")
    b.add_argument("--shapes-images", type=int, default=200)
    b.add_argument("--quality", action="store_true",
                   help="instead: the Shapes mini model's acceptance bars, judged on the smoke report's results files "
                        "(grounding gap, box AP50 vs real images and the shuffled floor, attributes, alpha=0); "
                        "exit 1 on a FAIL")
    b.add_argument("--results", default=None, help="with --quality: the results folder (default results/)")
    b.add_argument("--quality-fresh", action="store_true",
                   help="instead: generate and score afresh (box AP50, attribute accuracy vs chance, mean over seeds)")
    b.add_argument("--quality-images", type=int, default=48)
    b.add_argument("--guidance", type=float, default=3.0)
    b.add_argument("--protocol", action="store_true",
                   help="instead: the full protocol's cost on this device (sd15 size, random weights unless --model; "
                        "50 steps): UNet time per batch, MIS batched vs official order, s/image and peak memory per "
                        "setting, and the GPU-hours of jobs/params/full projected from them")
    b.add_argument("--model", default=None, help="with --protocol: a converted folder instead of random weights; "
                                                "with --layout-batch: the model (folder or preset)")
    b.add_argument("--protocol-images", type=int, default=12, help="with --protocol: images per setting")
    b.add_argument("--budget", type=float, default=None, help="with --protocol: stop the per-setting part after "
                                                              "this many seconds")
    b.add_argument("--out", default=None, help="with --protocol: write the measurements (JSON) here")
    b.add_argument("--project", default=None, help="instead: the projection from a --protocol --out file")
    b.add_argument("--params-dir", default=None, help="with --protocol/--project: params set (default jobs/params/full)")
    b.add_argument("--coco-root", default=None, help="with --protocol/--project: COCO's per-image instance counts "
                                                     "(default: COCO's mean, 7.4)")
    b.set_defaults(func=cmd_bench)
    da = sub.add_parser("data", help="datasets: COCO val2017, its 512x512 resized instances, the Shapes world")
    dsub = da.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("coco", help="download COCO val2017 images and annotations (fails fast offline)")
    dc.add_argument("--root", required=True)
    dc.add_argument("--parts", nargs="+", default=["val2017", "annotations"])
    dr = dsub.add_parser("resize-512", help="derive the protocol's 512x512 instances file from the original")
    dr.add_argument("src")
    dr.add_argument("dst")
    dr.add_argument("--size", type=int, default=512)
    dsh = dsub.add_parser("shapes", help="write the procedural Shapes world (COCO format)")
    dsh.add_argument("--out", required=True)
    dsh.add_argument("--n", type=int, default=200)
    dsh.add_argument("--seed", type=int, default=0)
    dsh.add_argument("--size", type=int, default=64)
    dsh.add_argument("--split", default="val")
    da.set_defaults(func=cmd_data)

    ev = sub.add_parser("eval", help="the paper's evaluation protocol: generate, then score")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    eg = esub.add_parser("generate", help="generate one setting's images for a shard of the dataset")
    eg.add_argument("--setting", required=True, choices=["box", "mask", "point", "scribble", "color", "texture"])
    eg.add_argument("--shard", default="0/1", help="I/N: this job's share (union of shards = one run)")
    eg.add_argument("--instances", required=True, help="instances json (512x512 resized for COCO)")
    eg.add_argument("--captions", default=None, help="captions json (the protocol uses the first caption)")
    eg.add_argument("--out", required=True)
    eg.add_argument("--model", required=True, help="converted folder (instdiff convert), official .pth, or a preset "
                    "name (random weights: tests only)")
    eg.add_argument("--seed", type=int, default=0, help="base seed; image seed = f(base seed, image id)")
    eg.add_argument("--steps", type=int, default=None)
    eg.add_argument("--guidance", type=float, default=None)
    eg.add_argument("--alpha", type=float, default=None)
    eg.add_argument("--mis", type=float, default=None)
    eg.add_argument("--format", default=IMAGE_FORMAT, choices=["jpg", "png"],
                    help="image format (the protocol: jpg, like the official eval and the notebooks)")
    eg.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality (official: PIL default 75)")
    eg.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    eg.add_argument("--max-batch", type=int, default=None, help=MAX_BATCH_HELP)
    eg.add_argument("--layout-batch", type=int, default=1,
                    help="images sampled together, their branches in the same UNet batches (fuller batches on a CPU; "
                         "equal to one at a time up to float rounding)")
    eg.add_argument("--device", default="auto")
    eg.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    eg.set_defaults(func=cmd_eval_generate)

    pl = sub.add_parser("plan", help="prompt -> layout JSONs through an OpenAI-compatible LLM (or --offline)")
    pl.add_argument("prompt")
    pl.add_argument("--n", type=int, default=10, help="layouts to plan for the prompt")
    pl.add_argument("--out", required=True)
    pl.add_argument("--instances", default="3-8", help="instances per layout: N or MIN-MAX")
    pl.add_argument("--canvas", type=int, default=512)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--llm-model", default=None, help="default: $INSTDIFF_LLM_MODEL")
    pl.add_argument("--base-url", default=None, help="default: $INSTDIFF_LLM_BASE_URL (OpenAI, vLLM, Ollama, ...)")
    pl.add_argument("--temperature", type=float, default=0.7)
    pl.add_argument("--max-retries", type=int, default=4)
    pl.add_argument("--offline", action="store_true", help="deterministic template planner (labelled as such)")
    pl.set_defaults(func=cmd_plan)

    es = esub.add_parser("score", help="score one setting's images (guards first); prints throughput")
    es.add_argument("--setting", required=True,
                    choices=["box", "mask", "point", "scribble", "color", "texture", "real"])
    es.add_argument("--images", default=None, help="generated folder with its manifest (not for --setting real)")
    es.add_argument("--instances", required=True, help="ground-truth instances json (512x512 resized for COCO)")
    es.add_argument("--captions", default=None)
    es.add_argument("--real-images", default=None, help="the dataset's real images: the guard compares against them; "
                                                         "the 'real' control scores them")
    es.add_argument("--yolo", default="yolov8m-seg.pt", help="local YOLO weights (.pt) or a .yaml config")
    es.add_argument("--clip-model", default="ViT-L-14")
    es.add_argument("--clip-pretrained", default="laion2b_s32b_b82k", help="open_clip tag or a local checkpoint")
    es.add_argument("--fid-real", default=None, help="real image folder for FID (optional)")
    es.add_argument("--batch", type=int, default=16)
    es.add_argument("--seed", type=int, default=0, help="seed of the scribble-PiM pixel sampling")
    es.add_argument("--limit", type=int, default=None)
    es.add_argument("--device", default="auto")
    es.add_argument("--out", default=None, help="write a results json with provenance")
    es.add_argument("--profile", choices=["smoke", "full"], default="smoke",
                    help="'full' only for complete protocol runs; smoke numbers never enter paper tables")
    es.set_defaults(func=cmd_eval_score)

    from instdiff_lib.training.diffusion import add_train_parser
    from instdiff_lib.training.evaluators import add_evaluator_parsers

    add_evaluator_parsers(add_train_parser(sub))  # instdiff train shapes | shapes-yolo | shapes-clip
    from instdiff_lib.report.runner import add_report_parser

    add_report_parser(sub)  # instdiff report notebook|all|generate|preflight|blog
    from instdiff_lib.report.rehearsal import add_rehearse_parser

    add_rehearse_parser(sub)  # instdiff rehearse

    q = sub.add_parser("parity", help="compare with the official implementation's golden tensors (shared/parity)")
    q.add_argument("--fixture", default=None, help="fixture folder (default: $INSTDIFF_PARITY_DIR or ../shared/parity)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    q.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA in fp32 (off by default here)")
    q.set_defaults(func=cmd_parity)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from instdiff_lib.weights.checkpoint import CheckpointError
    from instdiff_lib.layouts.layout import LayoutError
    from instdiff_lib.model.text import PromptTooLongError

    try:
        return args.func(args)
    except (CheckpointError, LayoutError, PromptTooLongError, FileNotFoundError, ValueError, RuntimeError) as e:
        # (NotebookFailed is a RuntimeError: the message names the executed copy with the traceback)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    sys.exit(main())
