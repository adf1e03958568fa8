"""`diffsynth render | plan | status | demo | smooth | models check`. Exit codes: 0 done, 1 internal error, 2 bad input, 3 interrupted."""

import argparse
import json
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from .config import FastBlendSettings
from .errors import Interrupted, UserError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3


def _parser():
    parser = argparse.ArgumentParser(prog="diffsynth", description="Toon-shade long videos, resumably, on disk.")
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="run or resume the render a config describes")
    render.add_argument("config", help="YAML/JSON config file, or an original Diffutoon script (its "
                        "`config = {...}` is read, the script is not run; its paths are relative to the current folder)")
    render.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (repeatable), e.g. --set pipeline.seed=3")
    render.add_argument("--no-progress", action="store_true", help="no progress bars (the log is still written)")
    render.add_argument("--workers", type=int, metavar="N",
                        help="compute on N workers at once through a local Ray instance (executor.workers; 1 = in "
                             "this process, the default)")
    render.add_argument("--ray", metavar="ADDRESS", help='join a Ray cluster and compute on its workers '
                        '(executor.address: "auto" or "ray://host:10001")')
    render.add_argument("--verify", action="store_true",
                        help="check every cached unit's checksum first and recompute damaged ones (reads the whole "
                             "cache; without it sizes are checked at start and checksums on every read)")
    render.add_argument("--force", action="store_true",
                        help="render even when the disk's free space looks too small for the predicted peak "
                             "(see `diffsynth plan`)")
    plan = commands.add_parser("plan", help="before rendering: the stages, the disk (peak and final) under "
                               "data.keep, the VRAM, and for an existing run folder what is done and the time left")
    plan.add_argument("config", help="the config, as for render")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                      help="override one config value (repeatable), as for render")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    status = commands.add_parser("status", help="how far a run folder is")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    demo = commands.add_parser("demo", help="generate the demo assets if missing and render them")
    demo.add_argument("--output-folder", help="run folder (default: the demo config's, runs/demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--write-config", metavar="PATH",
                      help="write a copy of the demo config with absolute paths (a starting point to edit, "
                           "rendering into runs/<its name> beside it) and exit without rendering")
    smooth = commands.add_parser("smooth", help="FastBlend a rendered video, guided by the original (resumable)")
    smooth.add_argument("--guide", required=True, help="the original video")
    smooth.add_argument("--style", required=True, help="the rendered (flickering) video, frame for frame")
    smooth.add_argument("-o", "--output", required=True, help="the smoothed video to write")
    smooth.add_argument("--run-dir", help="where its cache lives (default: beside the output, OUT.smooth-run)")
    smooth.add_argument("--crf", type=int, default=17)
    smooth.add_argument("--device", default="auto")
    smooth.add_argument("--no-progress", action="store_true")
    smooth.add_argument("--shots", default="none", metavar="auto|none|I,J,…",
                        help="no FastBlend window blends two shots: auto = hard cuts detected on the guide "
                             "(PySceneDetect); none = one shot (default, as the original FastBlend); or the frames "
                             "where a new shot starts, comma-separated (e.g. 120,388)")
    smooth.add_argument("--shot-threshold", type=float, default=None,
                        help="--shots auto: the content detector's threshold (default 27, PySceneDetect's)")
    _add_schema_options(smooth, FastBlendSettings, aliases={"inference_mode": "--mode"})
    models = commands.add_parser("models", help="inspect the model files a config names")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    check = models_commands.add_parser("check", help="list every model file, what it is, and its problems")
    check.add_argument("config", help="YAML config file")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return parser


def _add_schema_options(parser, schema, aliases=()):
    """One --option per schema field (FastBlend's settings): names, defaults and help come from the schema."""
    aliases = dict(aliases)
    for name, field in schema.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"] + ([aliases[name]] if name in aliases else [])
        kind = field.annotation
        options = {"dest": name, "default": None, "help": f"{field.description or ''} (default {field.get_default(call_default_factory=True)})"}
        if getattr(kind, "__origin__", None) is list:
            options.update(nargs="*", type=int)
        elif kind in (int, float):
            options["type"] = kind
        elif getattr(kind, "__args__", None):
            options["choices"] = list(kind.__args__)
        parser.add_argument(*flags, **options)


def cmd_smooth(args):
    from .config import DataConfig, FastBlendSettings
    from .smooth_video import smooth_video

    given = {name: getattr(args, name) for name in FastBlendSettings.model_fields if getattr(args, name) is not None}
    try:
        settings = FastBlendSettings(**given)
    except ValidationError as error:
        first = error.errors()[0]
        raise UserError(f"--{'-'.join(str(p) for p in first['loc']).replace('_', '-')}: "
                        f"{first['msg'].removeprefix('Value error, ')}") from None
    shots = args.shots.strip()
    if shots not in ("auto", "none"):
        try:
            shots = [int(part) for part in shots.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"--shots {args.shots}: give auto, none, or frame indices separated by commas "
                            "(e.g. 120,388)") from None
    try:  # the render config's own checks (non-negative, increasing, a positive threshold)
        data = DataConfig.model_validate({"input_frames": {"video_file": args.guide}, "output_folder": ".",
                                          "shots": shots, **({"shot_threshold": args.shot_threshold}
                                                             if args.shot_threshold is not None else {})})
    except ValidationError as error:
        first = error.errors()[0]
        raise UserError(f"--{str(first['loc'][0]).replace('_', '-')}: "
                        f"{first['msg'].removeprefix('Value error, ')}") from None
    print(smooth_video(args.guide, args.style, args.output, settings, run_dir=args.run_dir, crf=args.crf,
                       device=args.device, progress=not args.no_progress, shots=data.shots,
                       shot_threshold=data.shot_threshold))


def cmd_render(args):
    from .render import render

    if getattr(args, "workers", None) is not None:
        args.overrides.append(f"executor.workers={args.workers}")
    if getattr(args, "ray", None):
        args.overrides.append(f"executor.address={args.ray}")

    config = load_render_config(args)
    video = render(config, progress=not args.no_progress, verify=getattr(args, "verify", False),
                   force=getattr(args, "force", False))
    print(video)


def load_render_config(args):
    """The config `args.config` names with `args.overrides` applied, read as render reads it (plan uses it too)."""
    from .config import load_config, read_text

    if Path(args.config).suffix == ".py":  # an original Diffutoon script: its config literal, never executed
        from .diffutoon import load_script_config
        return load_script_config(args.config, args.overrides)
    if original_layout(args.config):  # a YAML/JSON config in the original's layout: converted as a script's
        from .diffutoon import load_original_config
        return load_original_config(yaml.safe_load(read_text(args.config)), args.overrides)
    return load_config(args.config, args.overrides)


def cmd_plan(args):
    from .plan import make_plan, plan_lines

    plan = make_plan(load_render_config(args))
    if args.json:
        print(json.dumps(plan, indent=2))
        return
    print("\n".join(plan_lines(plan)))


def original_layout(path):
    """Whether a YAML/JSON config file is in the original Diffutoon's layout (false for anything unreadable: the
    normal loader then reports it)."""
    from .config import read_text
    from .diffutoon import is_original_layout
    try:
        return is_original_layout(yaml.safe_load(read_text(path)))
    except (UserError, yaml.YAMLError):
        return False


def cmd_demo(args):
    from .demo import DEMO_CONFIG, ensure_demo_assets, write_demo_config

    ensure_demo_assets()
    if args.write_config:
        print(write_demo_config(args.write_config, args.overrides))
        return
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
        state = ("complete (files released)" if stage["retired"] else "complete") if stage["complete"] else ""
        print(f"  {stage['name']:<28} {stage['done']:>6}/{stage['total']:<6} "
              f"{stage['bytes'] / 1e6:>10.1f} MB  {state}")
    if report["units_left"]:
        print(f"{report['units_left']} unit(s) left to compute; `diffsynth render` on its config continues")
    else:
        print("nothing left to compute: rendering the same config again reuses every unit")


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
    handlers = {"render": cmd_render, "status": cmd_status, "demo": cmd_demo, "models": cmd_models,
                "smooth": cmd_smooth, "plan": cmd_plan}
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
    except BrokenPipeError:  # `diffsynth status RUN | head -1`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush fails silently too
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
