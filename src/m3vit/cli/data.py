"""``m3vit data show``: look at a dataset, a PNG grid of samples with every label coloured."""

from __future__ import annotations

from .choices import DATASETS, PEOPLE_MODES
from .common import CLIError, Parser, positive_int


#: Most samples one ``data show`` figure holds.
MAX_ROWS = 64


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="look at a dataset")
    data = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    p = data.add_parser("show", help="write a PNG grid of samples: the image and every label, coloured")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS)
    p.add_argument("--root", help="dataset root (PASCAL_MT or NYUD_MT tree; not needed for synthetic)")
    p.add_argument("--split", default="train")
    p.add_argument("--tasks", nargs="+", help="labels to show (default: every task of the dataset)")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="render size of the synthetic scenes (default 128 128); for real data: resize to this")
    p.add_argument("--num", type=positive_int, default=4, help=f"number of samples (rows; 1 to {MAX_ROWS})")
    p.add_argument("--start", type=int, default=0, help="index of the first sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--people", choices=PEOPLE_MODES,
                   help="synthetic scenes: people in ~3/4 of the scenes, far (sparse, default) or 1-2 near the camera")
    p.add_argument("--out", default="samples.png", help="PNG to write")
    p.set_defaults(func=run_show)


def run_show(args) -> int:
    from ..data import DATASETS, build_dataset, datasets_with_people
    from ..data.show import render_grid

    if args.start < 0:
        raise CLIError("--start must be >= 0")
    if args.num > MAX_ROWS:  # one figure: thousands of rows would render for minutes into an unviewable PNG
        raise CLIError(f"--num must be <= {MAX_ROWS} (one figure), got {args.num}; use --start to page through")
    options = {"size": tuple(args.size)} if args.size else {}
    if not DATASETS[args.dataset].reads_files:  # rendered: as many samples as shown
        options["length"] = args.start + args.num
    if DATASETS[args.dataset].people_modes:
        options["people"] = args.people
    elif args.people is not None:
        raise CLIError(f"--people applies to the {' or '.join(datasets_with_people())} scenes only")
    dataset = build_dataset(args.dataset, args.split, root=args.root, seed=args.seed, tasks=args.tasks, **options)
    stop = min(args.start + args.num, len(dataset))
    if args.start >= stop:
        raise CLIError(f"--start {args.start} is past the end of the {args.split} split ({len(dataset)} samples)")
    path = render_grid(dataset, list(range(args.start, stop)), args.out)
    print(f"wrote {path} ({stop - args.start} {args.dataset} {args.split} samples: image + "
          f"{', '.join(dataset.tasks)})")
    return 0
