"""
The training plot: train and val loss against steps, and HellaSwag beside them when the run evaluated it. train.py
redraws it after every evaluation; from the command line it redraws any log.jsonl:

    python misc/plot_log.py log/log.jsonl misc/gpt2-124m.png
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules

from checkpoint import check_output_path, read_jsonl, read_log  # noqa: E402
from utils import UserError, atomic_write, run_cli  # noqa: E402

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI's GPT-2 124M on FineWeb-Edu's val split (build-nanogpt)
GPT2_124M_HELLASWAG = 0.2955  # its completion-style acc_norm
GPT3_124M_HELLASWAG = 0.337  # GPT-3 paper, 125M model


def plot_log(log_path, png_path):
    """A run on FineWeb-Edu gets GPT-2 124M's val loss as a reference line; the HellaSwag panel gets GPT-2's and
    GPT-3's scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        raise UserError(f"{log_path} holds no step records to plot")
    config = next((r for r in read_jsonl(log_path) if isinstance(r, dict) and r.get("event") == "config"), {})

    def series(key):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    hellaswag = series("hellaswag_acc_norm")
    n_panels = 2 if hellaswag[0] else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(7 * n_panels, 5), squeeze=False)
    ax_loss = axes[0][0]
    ax_loss.plot(*series("train_loss"), label="train loss", alpha=0.6, linewidth=0.8)
    ax_loss.plot(*series("val_loss"), label="val loss", marker=".")
    if "fineweb" in str(config.get("data_dir", "")).lower():
        label = f"GPT-2 124M val loss ({GPT2_124M_VAL_LOSS})"
        ax_loss.axhline(GPT2_124M_VAL_LOSS, color="r", linestyle="--", label=label)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", yscale="log")
    ax_loss.legend()
    if n_panels == 2:
        ax_hella = axes[0][1]
        ax_hella.plot(*hellaswag, label="HellaSwag acc_norm", marker=".")
        ax_hella.set_xlim(ax_loss.get_xlim())
        ax_hella.axhline(GPT2_124M_HELLASWAG, color="r", linestyle="--", label=f"GPT-2 124M ({GPT2_124M_HELLASWAG})")
        ax_hella.axhline(GPT3_124M_HELLASWAG, color="g", linestyle="--", label=f"GPT-3 124M ({GPT3_124M_HELLASWAG})")
        ax_hella.set(xlabel="step", ylabel="accuracy (completion style)")
        ax_hella.legend()
    fig.tight_layout()
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="a log.jsonl written by train.py")
    parser.add_argument("png", nargs="?", help="where to write the plot (default: loss.png beside the log)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.log):
        raise UserError(f"{args.log} is not a file" if os.path.exists(args.log) else f"{args.log} does not exist")
    png = args.png or os.path.join(os.path.dirname(args.log), "loss.png")
    check_output_path(png, "the plot")
    plot_log(args.log, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    run_cli(main)
