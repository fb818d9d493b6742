"""``python -m sar_backbones.inference.native build [--verbose]``: compile the native kernel."""
import argparse

from . import build, library_path

if __name__ == '__main__':
    parser = argparse.ArgumentParser(prog='python -m sar_backbones.inference.native',
                                     description='Build (once) the native refine kernel.')
    parser.add_argument('command', choices=['build', 'path'])
    parser.add_argument('--verbose', action='store_true')
    args = parser.parse_args()
    print(build(verbose=args.verbose) if args.command == 'build' else library_path())
