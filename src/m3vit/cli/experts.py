"""``m3vit experts``: per task and MoE layer, how often each expert is chosen; usage.json, summary.md and
heatmaps (the per-block text is ``m3vit.analysis.experts.ExpertUsage.to_text``)."""

from __future__ import annotations

import json
import sys

from .common import CLIError, add_device_option, device, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("experts", help="per task and MoE layer, how often each expert is chosen; heatmaps")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory of an MoE model")
    p.add_argument("--out", required=True, help="output folder for usage.json and the heatmap PNGs")
    p.add_argument("--tasks", nargs="+", help="tasks to analyse (default: every task of the model)")
    p.add_argument("--split", help="dataset split (default: the run's data.val_split)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="run config override, e.g. --set data.seed=3")
    p.add_argument("--limit", type=positive_int, help="use only the first N samples")
    p.add_argument("--batch-size", dest="eval_batch_size", type=positive_int,
                   help="default: the run's eval.batch_size")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="a task's core experts take at least this share of its assignments (default 0.9)")
    add_device_option(p)
    p.add_argument("--json", action="store_true", help="print usage.json's content")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.builders import build_eval_dataset
    from ..engine.checkpoints import checkpoint_step, load_run
    from ..analysis.experts import expert_usage, plot_heatmaps, write_summary, write_usage
    from ..models import moe_block_indices
    from ..utils.io import OutputFolder

    model, cfg = load_run(args.checkpoint, args.set or [], map_location=device(args.device))
    if not model.moe_layers:
        raise CLIError(f"{args.checkpoint}: model {model.config.name!r} is dense (no MoE layer); expert usage "
                       f"needs an MoE checkpoint")
    if not 0 < args.threshold <= 1:
        raise CLIError(f"--threshold must be in (0, 1], got {args.threshold}")
    tasks = model.resolve_tasks(args.tasks)
    split = args.split or cfg.data.val_split
    dataset = build_eval_dataset(cfg, split=split)
    batch_size = cfg.eval.batch_size if args.eval_batch_size is None else args.eval_batch_size
    extra = {"checkpoint": str(args.checkpoint), "step": checkpoint_step(args.checkpoint),
             "data": {**cfg.to_dict()["data"], "split": split}}
    with OutputFolder(args.out, kind="experts") as out:
        # Before the work: none of the outputs may replace a file m3vit did not write.
        out.claim(["usage.json", "summary.md", *(f"experts_block{b}.png" for b in moe_block_indices(model)),
                   "experts_all.png"])
        usage = expert_usage(model, dataset, tasks, limit=args.limit, batch_size=batch_size,
                             progress=not args.json and sys.stderr.isatty())
        pictures = plot_heatmaps(usage, out.path, threshold=args.threshold)
        json_path = write_usage(usage, out.path("usage.json"), threshold=args.threshold, extra=extra)
        write_summary(usage, out.path("summary.md"), threshold=args.threshold)
    if args.json:
        print(json.dumps({**extra, **usage.to_dict(args.threshold)}, indent=2))
        return 0
    print(f"{args.checkpoint}: expert usage of {len(tasks)} task(s) on {usage.num_images} {cfg.data.name} {split} "
          f"images, top-{usage.top_k} of {usage.num_experts} experts; core = the fewest experts taking "
          f">= {args.threshold:.0%} of a task's assignments")
    print(usage.to_text(args.threshold))
    print(f"wrote {json_path}, summary.md and {len(pictures)} heatmaps in {args.out}")
    return 0
