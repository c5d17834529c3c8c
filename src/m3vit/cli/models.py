"""``m3vit models``: the registered model names, one line each."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the registered model names")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import describe_models

    for name, text in describe_models().items():
        print(f"{name:14s} {text}")
    return 0
