"""Command-line argument checks shared by the tools, benchmarks and the data generator.

Every tool validates every argument before it does any work: numbers are
finite and in range, lists have the right number of values, and outputs do
not replace a file the user did not ask to replace. A user mistake ends in
one line on stderr naming the argument, and exit status 2 (argparse's own
convention for usage errors), never in a traceback.

The ``type=`` factories below raise :class:`argparse.ArgumentTypeError`, so
argparse itself prefixes the argument's name to the message::

    parser = ArgumentParser()
    parser.add_argument('--num-images', type=positive_int)
    parser.add_argument('--rate', type=float_in(0, 1), nargs='+')
    parser.add_argument('--shape', type=positive_int, nargs='+', action=count_between(1, 2))
    # --num-images 0  ->  "prog: error: argument --num-images: must be an integer >= 1, got '0'"
"""
from __future__ import annotations
import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Tuple

__all__ = [
    'ArgumentParser', 'int_in', 'positive_int', 'non_negative_int', 'image_side', 'float_in',
    'finite_float', 'size_in', 'size_hw', 'count_between', 'check_output_file',
    'check_report_paths', 'check_output_dir', 'check_no_overlap'
]


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr.

    argparse prints the whole (often multi-line) usage before the error; the
    tools print only ``<prog>: error: <message> (see --help)`` and exit 2.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``message`` as one line and exit with status 2."""
        one_line = ' '.join(str(message).split())
        self.exit(2, f'{self.prog}: error: {one_line} (see --help)\n')


def _describe_bounds(low: Optional[float], high: Optional[float], low_open: bool,
                     high_open: bool) -> str:
    if low is not None and high is not None:
        return (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return 'finite'


def int_in(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[str], int]:
    """``type=`` for an integer in ``[low, high]`` (None: unbounded on that side).

    Args:
        low: Smallest accepted value.
        high: Largest accepted value.

    Returns:
        A parser of one command-line string.
    """
    what = 'an integer' + ('' if low is None and high is None else ' ' + _describe_bounds(
        low, high, False, False))

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}') from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}')
        return value

    parse.__name__ = what  # argparse names the type in some of its own messages
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
# Sides of a network input: a stride-32 ResNet needs 32 px; far larger
# inputs only exhaust memory.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 16384
image_side = int_in(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)


def float_in(low: Optional[float] = None, high: Optional[float] = None, *,
             low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """``type=`` for a finite float in the given range (NaN and infinities refused).

    Args:
        low: Lower bound (None: unbounded).
        high: Upper bound (None: unbounded).
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.

    Returns:
        A parser of one command-line string.
    """
    bounds = _describe_bounds(low, high, low_open, high_open)
    what = 'a finite number' + ('' if bounds == 'finite' else f' {bounds}')

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}') from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}')
        return value

    parse.__name__ = what
    return parse


finite_float = float_in()


def size_in(low: int = 1, high: Optional[int] = None) -> Callable[[str], Tuple[int, int]]:
    """``type=`` for an image size ``'H'`` (square) or ``'HxW'``, sides in ``[low, high]``.

    Args:
        low: Smallest side.
        high: Largest side (None: unbounded).

    Returns:
        A parser of one command-line string into ``(height, width)``.
    """
    sides_ok = f'integer sides {_describe_bounds(low, high, False, False)}'

    def parse(text: str) -> Tuple[int, int]:
        parts = str(text).lower().replace('*', 'x').split('x')
        message = f'must be H or HxW with {sides_ok}, e.g. 224 or 800x1216, got {text!r}'
        if len(parts) not in (1, 2):
            raise argparse.ArgumentTypeError(message)
        try:
            sides = [int(part.strip(), 10) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(message) from None
        if min(sides) < low or (high is not None and max(sides) > high):
            raise argparse.ArgumentTypeError(message)
        return sides[0], sides[-1]

    parse.__name__ = 'size'
    return parse


size_hw = size_in()


def count_between(low: int, high: int) -> type:
    """``action=`` for ``nargs='+'`` options that take ``low`` to ``high`` values.

    argparse itself only knows "exactly N" or "one or more"; ``--shape`` takes
    H or H W, and three values must be an error rather than silently ignored.

    Args:
        low: Fewest values.
        high: Most values.

    Returns:
        An :class:`argparse.Action` subclass.
    """

    class CountBetween(argparse.Action):

        def __call__(self, parser, namespace, values, option_string=None):
            count = len(values)
            if not low <= count <= high:
                wanted = (f'{low}' if low == high else f'{low} or {high}' if high == low + 1
                          else f'{low} to {high}')
                raise argparse.ArgumentError(self, f'takes {wanted} values, got {count}')
            setattr(namespace, self.dest, values)

    return CountBetween


def check_inputs_exist(parser: argparse.ArgumentParser,
                       inputs: Iterable[Tuple[str, Optional[str]]]) -> None:
    """Refuse input paths that do not exist, before any model is built.

    Args:
        parser: Reports the error (one line, exit 2).
        inputs: ``(option, path)`` pairs; None paths are not given and skipped.
    """
    for option, path in inputs:
        if path is not None and not Path(path).exists():
            parser.error(f'argument {option}: no such file or folder: {path}')


def check_output_file(parser: argparse.ArgumentParser, option: str, path: Optional[str],
                      overwrite: bool, inputs: Iterable[Tuple[str, Optional[str]]] = ()) -> None:
    """Refuse an output file that would replace something it should not.

    Args:
        parser: Reports the error (one line, exit 2).
        option: The option that names the output, e.g. ``'--out'``.
        path: The output path (None: nothing to check).
        overwrite: Whether the user asked to replace an existing file.
        inputs: ``(option, path)`` of the files the tool reads; an output may
            never be one of them, ``--overwrite`` or not.
    """
    if path is None:
        return
    target = Path(path)
    for input_option, input_path in inputs:
        if input_path is not None and _same_path(target, Path(input_path)):
            parser.error(f'argument {option}: {path} is also the input of {input_option}; '
                         'choose another output path')
    if target.is_dir():
        parser.error(f'argument {option}: {path} is a directory, not a file')
    if target.exists() and not overwrite:
        parser.error(f'argument {option}: {path} exists; pass --overwrite to replace it')
    _check_parent(parser, option, target)


def check_report_paths(parser: argparse.ArgumentParser, out: str, overwrite: bool,
                       inputs: Iterable[Tuple[str, Optional[str]]] = (),
                       option: str = '--out') -> None:
    """Check a benchmark report's JSON path and the markdown written next to it (``.md``).

    Args:
        parser: Reports the error (one line, exit 2).
        out: The JSON path.
        overwrite: Whether existing reports may be replaced.
        inputs: ``(option, path)`` of the files the tool reads.
        option: The option that names the JSON path.
    """
    if os.path.splitext(out)[1].lower() != '.json':
        parser.error(f'argument {option}: must end in .json (the markdown goes next to it), '
                     f'got {out}')
    inputs = list(inputs)
    check_output_file(parser, option, out, overwrite, inputs)
    check_output_file(parser, f'{option} (its markdown)', os.path.splitext(out)[0] + '.md',
                      overwrite, inputs)


def check_output_dir(parser: argparse.ArgumentParser, option: str, path: Optional[str],
                     overwrite: bool) -> None:
    """Refuse an output folder that is a file, or that already holds files.

    Args:
        parser: Reports the error (one line, exit 2).
        option: The option that names the folder, e.g. ``'--out-dir'``.
        path: The folder (None: nothing to check).
        overwrite: Whether the user allows writing into a non-empty folder
            (files of the same names are then replaced; others stay).
    """
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        parser.error(f'argument {option}: {path} exists and is not a directory')
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        parser.error(f'argument {option}: {path} is not empty; pass --overwrite to write '
                     'into it (files of the same names are replaced)')
    _check_parent(parser, option, target)


def check_no_overlap(parser: argparse.ArgumentParser,
                     outputs: Sequence[Tuple[str, Optional[str]]]) -> None:
    """Refuse two outputs of one run that name the same file."""
    seen = []
    for option, path in outputs:
        if path is None:
            continue
        for other_option, other in seen:
            if _same_path(Path(path), Path(other)):
                parser.error(f'argument {option}: {path} is also the output of {other_option}')
        seen.append((option, path))


def _check_parent(parser: argparse.ArgumentParser, option: str, target: Path) -> None:
    """The first existing ancestor must be a folder, or nothing can be created."""
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                parser.error(f'argument {option}: {parent} is a file, so {target} '
                             'cannot be created')
            return


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def run_tool(main: Callable[[], object]) -> None:
    """Run a tool's ``main``; an unreadable or mismatched checkpoint is one line and exit 2.

    The checkpoint errors are user mistakes (a wrong ``--checkpoint``,
    ``load_from`` or ``Pretrained`` file), found only once the file is read,
    after argument parsing: they get the same one-line treatment as a bad
    argument instead of a traceback.
    """
    from sar_backbones.models.backbones.checkpoint import (BackboneCheckpointMismatchError,
                                                           CheckpointReadError)
    try:
        main()
    except (CheckpointReadError, BackboneCheckpointMismatchError) as error:
        message = ' '.join(str(error).split())
        sys.stderr.write(f'{os.path.basename(sys.argv[0])}: error: {message}\n')
        sys.exit(2)
