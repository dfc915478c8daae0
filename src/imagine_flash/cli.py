"""`imagine-flash pretrain|distill|sample|evaluate`: the command line. Errors in input are one line, exit 2."""
from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _resolve(cfg, args, direct: dict):
    from .config import apply_overrides, load_yaml, parse_sets

    if args.config:
        apply_overrides(cfg, load_yaml(args.config), args.config)
    apply_overrides(cfg, {k: v for k, v in direct.items() if v is not None}, "command line")
    apply_overrides(cfg, parse_sets(args.set), "--set")
    return cfg


def cmd_pretrain(args) -> None:
    import dataclasses
    import json

    from .config import PretrainConfig
    from .pretrain import pretrain

    cfg = _resolve(PretrainConfig(), args, {"out": args.out, "max_steps": args.max_steps, "seed": args.seed})
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    if args.dry_run:
        return
    print(pretrain(cfg, resume=args.resume))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagine-flash", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pt = sub.add_parser("pretrain", help="train the small embedded teacher on coloured Fashion-MNIST")
    pt.add_argument("--out", help="run folder (default runs/teacher)")
    pt.add_argument("--max-steps", type=int, help="number of updates")
    pt.add_argument("--seed", type=int, help="random seed")
    _add_config_args(pt)
    pt.set_defaults(fn=cmd_pretrain)
    return p


class _Parser(argparse.ArgumentParser):
    pass


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.fashion import DataMissingError
    from .models import ModelFolderError

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, DataMissingError, ModelFolderError, FileNotFoundError) as e:
        print(f"imagine-flash {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imagine-flash {args.command}: interrupted; the latest checkpoint is kept, rerun with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
