"""
Redraw the training plot from any log.jsonl:  python misc/plot_log.py log/log.jsonl misc/gpt2-124m.png
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules

from utils import UserError, check_output_path, plot_log, run_cli  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="a log.jsonl written by train.py")
    parser.add_argument("png", nargs="?", help="where to write the plot (default: loss.png beside the log)")
    args = parser.parse_args()
    if not os.path.isfile(args.log):
        raise UserError(f"{args.log} is not a file" if os.path.exists(args.log) else f"{args.log} does not exist")
    png = args.png or os.path.join(os.path.dirname(args.log), "loss.png")
    check_output_path(png, "the plot")
    plot_log(args.log, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    run_cli(main)
