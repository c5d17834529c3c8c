"""``m3vit analyze conflicts | compare``: gradient conflicts between tasks, and two checkpoints' specialisation
side by side (``m3vit.analysis``, which also formats the text)."""

from __future__ import annotations

import contextlib
import json
import os

from .common import Parser, add_device_option, device, say


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="gradient conflicts between tasks; compare two checkpoints' "
                                              "specialisation")
    analyze = p.add_subparsers(dest="analyze_command", required=True, parser_class=Parser)

    def common(q, batches_help: str) -> None:
        q.add_argument("--batches", type=int, default=4, help=batches_help)
        q.add_argument("--batch-size", dest="eval_batch_size", type=int, help="default: the run's eval.batch_size")
        q.add_argument("--split", help="dataset split (default: the run's data.val_split)")
        q.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="run config override of the data, e.g. --set data.seed=3")
        add_device_option(q)
        q.add_argument("--out", help="also write JSON, Markdown and figures to this folder")
        q.add_argument("--json", action="store_true", help="print the results as JSON")

    q = analyze.add_parser("conflicts", help="cosine of the tasks' backbone gradients (< 0: the tasks conflict), "
                                             "for one checkpoint or along a run's step-N/ checkpoints")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (e.g. RUN/final)")
    src.add_argument("--run", help="training run folder: every checkpoints/step-N/ and final/ in step order")
    q.add_argument("--tasks", nargs="+", help="tasks to compare (default: every task of the model)")
    common(q, "validation batches per checkpoint (default 4)")
    q.set_defaults(func=run_conflicts)

    q = analyze.add_parser("compare", help="two checkpoints side by side: task-expert mutual information and "
                                           "expert overlap per MoE layer, and gradient conflicts, on the same data")
    q.add_argument("checkpoints", nargs=2, metavar="CHECKPOINT", help="two checkpoint directories (A and B)")
    q.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels of the two (default: their paths)")
    q.add_argument("--limit", type=int, help="images for the expert usage (default: the whole split)")
    common(q, "validation batches for the gradient conflicts (default 4)")
    q.set_defaults(func=run_compare)


def _checks(args) -> None:
    from ..utils.errors import InputError

    if args.batches < 1:
        raise InputError(f"--batches must be >= 1, got {args.batches}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.eval_batch_size}")


def _output_folder(args, names: list[str], stack: contextlib.ExitStack):
    """The ``--out`` folder (None without one), opened for the whole command and ``names`` claimed before any
    work, so a file of the user's there stops the command at once."""
    if not args.out:
        return None
    from ..utils.io import OutputFolder

    out = stack.enter_context(OutputFolder(args.out, kind="analysis"))
    out.claim(names)
    return out


def run_conflicts(args) -> int:
    from ..analysis import plot_conflict_evolution, plot_conflict_matrices
    from ..analysis.checkpoints import checkpoint_conflicts, conflicts_text, run_checkpoints
    from ..utils.io import write_json, write_text

    _checks(args)
    options = dict(tasks=args.tasks, batches=args.batches, batch_size=args.eval_batch_size, split=args.split,
                   device=device(args.device))
    written = []
    with contextlib.ExitStack() as stack:
        out = _output_folder(args, ["conflicts.json", "conflicts.md", "conflicts.png", "evolution.png"], stack)
        if args.run:
            steps = run_checkpoints(args.run)
            reports = {}
            for step, path in steps:
                if not args.json:
                    say(f"step {step}: {path}")
                reports[step] = checkpoint_conflicts(path, args.set or [], **options)
        else:
            report = checkpoint_conflicts(args.checkpoint, args.set or [], **options)
            reports = {report.info["step"]: report}
        last = reports[max(reports, key=lambda s: -1 if s is None else s)]
        data = ({"checkpoint": args.checkpoint, **last.to_dict()} if not args.run else
                {"run": args.run, "steps": {str(step): r.to_dict() for step, r in reports.items()}})
        if out is not None:
            written.append(write_json(out.path("conflicts.json"), data))
            title = f"Gradient conflicts of {args.checkpoint or args.run}"
            written.append(write_text(out.path("conflicts.md"), "\n".join(
                r.to_markdown(f"{title}" + ("" if not args.run else f", step {step}"))
                for step, r in reports.items())))
            label = f"step {last.info['step']}" if last.info.get("step") is not None else "checkpoint"
            written.append(plot_conflict_matrices({label: last.mean_cosine}, last.tasks, out.path("conflicts.png")))
            if args.run and len(reports) > 1:
                written.append(plot_conflict_evolution(reports, out.path("evolution.png")))
    return _report(args, data, lambda: conflicts_text(reports), written)


def run_compare(args) -> int:
    import numpy as np

    from ..analysis import plot_conflict_matrices
    from ..analysis.checkpoints import compare_checkpoints, compare_text
    from ..utils.io import write_json

    _checks(args)
    if args.limit is not None and args.limit < 1:
        from ..utils.errors import InputError

        raise InputError(f"--limit must be >= 1, got {args.limit}")
    written = []
    with contextlib.ExitStack() as stack:
        out = _output_folder(args, ["compare.json", "conflicts.png"], stack)
        result = compare_checkpoints(args.checkpoints[0], args.checkpoints[1], args.set or [], names=args.names,
                                     batches=args.batches, batch_size=args.eval_batch_size, limit=args.limit,
                                     split=args.split, device=device(args.device))
        if out is not None:
            written.append(write_json(out.path("compare.json"), result))
            matrices = {name: np.array(c["conflicts"]["cosine"], dtype=float)
                        for name, c in result["checkpoints"].items()}
            written.append(plot_conflict_matrices(matrices, result["tasks"], out.path("conflicts.png")))
    return _report(args, result, lambda: compare_text(result), written)


def _report(args, data: dict, text, written: list) -> int:
    """Print ``data`` as JSON (``--json``) or ``text()`` and the files written to ``--out``."""
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(text())
    if written:
        print(f"wrote {', '.join(os.path.basename(str(p)) for p in written)} in {args.out}")
    return 0
