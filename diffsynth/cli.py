"""`diffsynth render | status | demo | models check`. Exit codes: 0 done, 1 internal error, 2 bad input, 3 interrupted."""

import argparse
import json
import sys
from pathlib import Path

from .errors import Interrupted, UserError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3


def _parser():
    parser = argparse.ArgumentParser(prog="diffsynth", description="Toon-shade long videos, resumably, on disk.")
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="run or resume the render a config describes")
    render.add_argument("config", help="YAML config file")
    render.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (repeatable), e.g. --set pipeline.seed=3")
    render.add_argument("--no-progress", action="store_true", help="no progress bars (the log is still written)")
    status = commands.add_parser("status", help="how far a run folder is")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    demo = commands.add_parser("demo", help="generate the demo assets if missing and render them")
    demo.add_argument("--output-folder", help="run folder (default: the demo config's, runs/demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    demo.add_argument("--no-progress", action="store_true")
    models = commands.add_parser("models", help="inspect the model files a config names")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    check = models_commands.add_parser("check", help="list every model file, what it is, and its problems")
    check.add_argument("config", help="YAML config file")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return parser


def cmd_render(args):
    from .config import load_config
    from .pipeline import render

    config = load_config(args.config, args.overrides)
    video = render(config, progress=not args.no_progress)
    print(video)


def cmd_demo(args):
    from .demo import DEMO_CONFIG, ensure_demo_assets

    ensure_demo_assets()
    overrides = list(args.overrides)
    if args.output_folder:
        overrides.append(f"data.output_folder={Path(args.output_folder).resolve()}")
    args.config = DEMO_CONFIG
    args.overrides = overrides
    cmd_render(args)


def cmd_status(args):
    from .status import run_status

    report = run_status(args.run_dir)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['run_dir']}: {report['state']}")
    for stage in report["stages"]:
        print(f"  {stage['name']:<28} {stage['done']:>6}/{stage['total']:<6} "
              f"{stage['bytes'] / 1e6:>10.1f} MB  {'complete' if stage['complete'] else ''}")


def cmd_models(args):
    from .config import load_config
    from .models.check import check_models

    config = load_config(args.config, args.overrides)
    rows, problems = check_models(config.models)
    for status, path, text in rows:
        print(f"{status:<8} {path}: {text}")
    if problems:
        raise UserError(f"{problems} model problem(s) in {args.config}; see the lines marked PROBLEM above")
    print(f"all {len(rows)} model entries OK")


def main(argv=None):
    args = _parser().parse_args(argv)
    handlers = {"render": cmd_render, "status": cmd_status, "demo": cmd_demo, "models": cmd_models}
    try:
        handlers[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as interruption:
        print(f"interrupted: {interruption}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
