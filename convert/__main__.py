"""`python -m convert {ditdh,rae,gmm,inception,artifacts} ...`: one sub-command per artifact
kind, and `artifacts`, which runs them all over MM-FM's release folder."""

import argparse
import importlib
import sys

COMMANDS = {
    "ditdh": "convert.ditdh",
    "rae": "convert.rae",
    "gmm": "convert.gmm",
    "inception": "convert.inception",
    "artifacts": "convert.artifacts",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    argv = sys.argv[1:] if argv is None else argv
    chosen = [c for c in COMMANDS if c in argv[:1]]  # import only the chosen converter
    for name, module_name in COMMANDS.items():
        if chosen and name not in chosen:
            sub.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        modules[name] = module
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0],
                           description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    from convert.common import ConversionError
    try:
        modules[args.command].run(args)
    except ConversionError as e:
        print(f"convert {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
