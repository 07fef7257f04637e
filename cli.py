"""What the command-line scripts share: argparse types that refuse values which cannot work, the --int4 flags, and
the boundary that turns a bad file or value into a message and exit status 1.

    p.add_argument("--max_new_tokens", type=positive_int)
    p.add_argument("--sparsity", type=fraction(0, 0.99))

    @user_errors
    def main(argv=None): ...
"""
import argparse
import functools
import math

from safetensors import SafetensorError

from sparse import GroupQuant
from sparse_gemv.quant import GROUP_SIZES

# What a bad file or value raises (json and UTF-8 errors are ValueErrors; FloatingPointError: a checkpoint whose
# logits are not finite): reported in a line or two, not a traceback.
USER_ERRORS = (OSError, ValueError, FloatingPointError, SafetensorError)


def user_errors(main):
    """Wrap a script's main(argv): a USER_ERRORS exception ends it with its message and exit status 1."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except USER_ERRORS as e:
            raise SystemExit(f"error: {e}") from None
    return wrapped


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be {low} or more")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0")
    return value


def fraction(low: float, high: float, low_open: bool = False):
    """An argparse type for a number in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{value} is outside {'(' if low_open else '['}{low}, {high}]")
        return value
    return parse


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_int4_args(p: argparse.ArgumentParser) -> None:
    """--int4 and its options, shared by generate.py, the benchmarks and calibration."""
    p.add_argument("--int4", action="store_true", help="group-wise 4-bit weights for the seven projections, rounded to "
                   "nearest at load (fp16 scales; a quarter of the bytes of bf16)")
    p.add_argument("--group_size", type=int, default=128, choices=GROUP_SIZES, help="--int4: input channels per scale")
    p.add_argument("--zero_point", action=argparse.BooleanOptionalAction, default=True,
                   help="--int4: a zero beside each scale (asymmetric, the default); --no-zero_point: symmetric")


def int4_quant(a: argparse.Namespace) -> GroupQuant | None:
    """The GroupQuant that add_int4_args' flags ask for (None without --int4)."""
    if a.int4 and getattr(a, "int8", False):
        raise SystemExit("--int4 and --int8 exclude each other: pick one weight format")
    return GroupQuant(4, a.group_size, a.zero_point) if a.int4 else None
