"""
The run's log, <out-dir>/log.jsonl: written record by record by train.py (RunLog; with --wandb-project, the same
records go to Weights & Biases), drawn as loss.png after every evaluation, and summed up in report.md when the run
finishes. From the command line it redraws both from any log.jsonl:

    python misc/plot_log.py log/log.jsonl                      # log/loss.png and log/report.md again
    python misc/plot_log.py log/log.jsonl misc/gpt2-124m.png   # the plot elsewhere
"""

import argparse
import collections
import json
import os
import shlex
import signal
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules

from checkpoint import atomic_write, check_output_path, describe_write_error, read_jsonl, read_log  # noqa: E402
from http_files import check_reachable  # noqa: E402
from utils import UserError, first_line, run_cli  # noqa: E402

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI's GPT-2 124M on FineWeb-Edu's val split (build-nanogpt)
GPT2_124M_HELLASWAG = 0.2955  # its completion-style acc_norm
GPT3_124M_HELLASWAG = 0.337  # GPT-3 paper, 125M model
# GPT-2 124M's published HellaSwag scores (percent): completion acc, acc_norm (build-nanogpt's hellaswag.py), harness
# acc, acc_norm (lm-eval-harness, as the Open LLM Leaderboard reports them)
GPT2_124M_REFERENCE = (28.59, 29.55, 28.92, 31.14)


def append_jsonl(path, record):
    """Append one record. A line cut short by a kill is ended first, so the new record starts a line of its own."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


class RunLog:
    """What rank 0 logs: log.jsonl (one JSON object per line; a line a kill cut short is ended before the next) and,
    with --wandb-project, the same records in a Weights & Biases run, which a resume continues."""

    def __init__(self, out_dir, start, stop=None):
        self.out_dir, self.path, self.stop = out_dir, os.path.join(out_dir, "log.jsonl"), stop
        self.wandb_run, self.wandb_id = None, start.checkpoint and start.checkpoint.get("wandb_run_id")
        self.step_times = collections.deque(maxlen=20)  # the recent steps' seconds, for the time left
        self.failed = None  # why log.jsonl could not be written: the run stops, with a checkpoint if it can

    def write(self, record):
        try:
            append_jsonl(self.path, record)
        except OSError as e:  # a full disk: a run that cannot log stops, as if signalled, and says why at the end
            self.failed = self.failed or f"cannot write {self.path}: {describe_write_error(e, self.out_dir, 1 << 20)}"
            if self.stop is not None:
                self.stop.fail()
        if self.wandb_run is None or "event" in record:  # config, resume and end are the run's own state in wandb
            return
        metrics = {k: v for k, v in record.items() if k not in ("step", "samples")}
        try:
            if "samples" in record:  # text as a table: a row per sample
                import wandb

                rows = [[record["step"], text] for text in record["samples"]]
                metrics["samples"] = wandb.Table(columns=["step", "text"], data=rows)
            self.wandb_run.log(metrics, step=record["step"])
        except Exception as e:  # wandb's own failure (a network gone for good) is not the run's
            print(f"warning: Weights & Biases stopped taking records ({first_line(e)}); log.jsonl goes on",
                  file=sys.stderr)  # fmt: skip
            self.wandb_run = None

    def plot(self, png_path):
        """loss.png again; it is optional: a failure (a full disk) is a warning, and the run goes on."""
        try:
            plot_log(self.path, png_path)
        except OSError as e:
            print(f"warning: cannot draw {png_path} ({first_line(e)}); the run goes on", file=sys.stderr)

    def start(self, config, start, n_params, setup):
        """The first record of a run (its resolved config) or of a resumed one (what changed), and the plan."""
        if config.wandb_project:
            self.start_wandb(config.wandb_project, config.wandb_run_name, {**asdict(config), **setup})
        if start.checkpoint is None:  # the resolved config: the flags as this run applied them
            self.write(dict(event="config", **{**asdict(config), **setup}, n_params=n_params))
        else:
            saved = start.checkpoint["config"]
            changes = {k: [saved.get(k), v] for k, v in asdict(config).items() if k != "resume" and saved.get(k) != v}
            run = {k: setup[k] for k in ("world_size", "grad_accum_steps")}
            self.write(dict(event="resume", step=start.step, checkpoint=start.path, **run, changes=changes))
            if changes:
                changed = ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changes.items())
                print(f"note: settings changed since the checkpoint: {changed}")
        steps = config.max_steps - start.step
        print(f"plan: {steps:,} steps x {config.total_batch:,} tokens = {count(steps * config.total_batch)} tokens "
              f"(steps {start.step}..{config.max_steps}) on {setup['world_size']} x {setup['device_name']}, "
              f"{setup['grad_accum_steps']} micro-step(s) of {config.micro_batch} x {config.seq_len} tokens a step per "
              f"process; {n_params:,} parameters")  # fmt: skip

    def start_wandb(self, project, run_name, config):
        """A Weights & Biases run, started before the first step: with no login or no network, one line that says what
        to do, not wandb's traceback (at once) or its minute and a half of retries."""
        try:
            import wandb
        except ImportError as e:
            raise UserError(f"--wandb-project needs the wandb package ({e}): pip install wandb") from e
        online = os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun")
        if online and not wandb.login(prompt=False, verify=False):
            raise UserError("--wandb-project: no Weights & Biases login here: run `wandb login`, set WANDB_API_KEY, or "
                            "log offline with WANDB_MODE=offline (and `wandb sync` later)")  # fmt: skip
        try:
            if online:
                check_reachable(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
            self.wandb_run = wandb.init(project=project, name=run_name or None, id=self.wandb_id, resume="allow",
                                        config=config, dir=os.environ.get("WANDB_DIR") or self.out_dir)  # fmt: skip
        except (OSError, wandb.errors.Error) as e:
            raise UserError(f"--wandb-project: cannot start a Weights & Biases run ({first_line(e)}): check the "
                            "network, or log offline with WANDB_MODE=offline, `wandb sync` later") from e  # fmt: skip
        self.wandb_id = self.wandb_run.id  # kept in the checkpoints

    def step(self, step, max_steps, loss, lr, norm, dt, tokens_per_sec, mfu=None):
        """A training step's record and line: where the run is, how fast, and how long the rest will take."""
        entry = dict(step=step, train_loss=loss, lr=lr, grad_norm=norm, dt_ms=dt * 1000, tokens_per_sec=tokens_per_sec)
        self.write(entry if mfu is None else dict(entry, mfu=mfu))
        self.step_times.append(dt)
        left = sorted(self.step_times)[len(self.step_times) // 2] * (max_steps - step - 1)  # the median step, times
        print(
            f"step {step:5d}/{max_steps} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {dt * 1000:.1f}ms | "
            f"tok/sec {tokens_per_sec:,.0f}" + (f" | mfu {100 * mfu:.1f}%" if mfu else "") + f" | eta {duration(left)}"
        )

    def end(self, config, start, seconds, signum=0, resume_step=None):
        """The run's last record: stopped by a signal (resume_step: where a resume starts), or finished, with report.md
        and what to run next."""
        took = f" in {duration(seconds)}" if seconds else ""
        if signum:
            name = signal.Signals(signum).name
            self.write(dict(event="stopped", step=resume_step, signal=name))
            done = f"after step {resume_step - 1}" if resume_step else "before the first step"
            if not self.failed:  # else train.py says why, in one line
                print(f"stopped by {name} {done}: continue with --resume --out-dir {config.out_dir} (this run: "
                      f"{duration(seconds)})")  # fmt: skip
        elif start.finished:
            print(f"{config.out_dir} is finished: all {config.max_steps} steps are done (a larger --max-steps goes on)")
        else:
            self.write(dict(event="finished", step=config.max_steps, seconds=round(seconds, 1)))
            try:
                write_report(self.path, os.path.join(config.out_dir, "report.md"))
            except OSError as e:  # optional, like the plot: misc/plot_log.py writes it again
                print(f"warning: cannot write report.md ({first_line(e)})", file=sys.stderr)
            out, prompt = shlex.quote(config.out_dir), shlex.quote(config.sample_prompt)
            print(f"\nfinished {config.max_steps} steps{took}. In {config.out_dir}: report.md (the results), log.jsonl "
                  f"(every step and evaluation), loss.png (the curves), ckpt_NNNNNN.pt (checkpoints). Next:\n"
                  f"  python sample.py --model {out} --prompt {prompt}   # text from the newest checkpoint\n"
                  f"  python sample.py --model {out} --temperature 0.8 --max-new-tokens 200   # longer, less random\n"
                  f"  python hellaswag.py --model {out}   # its 10,042 examples are downloaded once into hellaswag/\n"
                  f"  python misc/plot_log.py {shlex.quote(self.path)}   # the plot and the report again")  # fmt: skip
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=128 + signum if signum else 0)
            self.wandb_run = None


def count(n):
    """5.00B, 12.6M or 10,240."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def duration(seconds):
    """1h02m, 4m05s or 12s."""
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s" if minutes else f"{s}s"


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


def write_report(log_path, report_path):
    """report.md: what a finished run is, in one page: the settings that matter, the machine, the time and speed, the
    final val loss, HellaSwag in both conventions next to GPT-2 124M's, the plot and the last samples."""
    events = [r for r in read_jsonl(log_path) if isinstance(r, dict) and "event" in r]
    config = next((r for r in events if r["event"] == "config"), {})
    records, end = read_log(log_path), next((r for r in reversed(events) if r["event"] == "finished"), {})
    last = {k: v for r in records for k, v in r.items()}  # the latest value of every key
    steps = [r for r in records if "dt_ms" in r]
    median = lambda key: sorted(r[key] for r in steps)[len(steps) // 2] if steps and key in steps[0] else None  # noqa
    tokens = config.get("max_steps", 0) * config.get("total_batch", 0)
    lines = [f"# {config.get('preset', 'a run')}: {count(tokens)} tokens of {config.get('data_dir', '?')}", "",
             "| setting | value |", "| --- | --- |"]  # fmt: skip
    shape = f"{config.get('n_layer')} layers x {config.get('n_embd')} wide, {config.get('n_head')} heads"
    settings = dict(model=f"{shape}, {config.get('n_params', 0):,} parameters",
                    batch=f"{config.get('total_batch', 0):,} tokens/step ({config.get('micro_batch')} x "
                          f"{config.get('seq_len')} x {config.get('world_size')} processes x "
                          f"{config.get('grad_accum_steps')} accumulation)",
                    steps=f"{config.get('max_steps')} (warmup {config.get('warmup_steps')}), max lr "
                          f"{config.get('max_lr')}, weight decay {config.get('weight_decay')}",
                    machine=f"{config.get('world_size')} x {config.get('device_name')}, torch {config.get('torch')}",
                    time=f"{duration(sum(r['dt_ms'] for r in steps) / 1000)} of steps"
                         + (f", {duration(end['seconds'])} in the last run" if end.get("seconds") else ""))  # fmt: skip
    if median("tokens_per_sec"):
        settings["speed"] = f"{median('tokens_per_sec'):,.0f} tokens/s (median step)"
        settings["speed"] += f", {100 * median('mfu'):.1f}% MFU" if median("mfu") else ""
    if "val_loss" in last:
        settings["final val loss"] = f"{last['val_loss']:.4f}"
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    if "hellaswag_acc" in last:
        ours = [100 * last[f"hellaswag_{k}"] for k in ("acc", "acc_norm", "harness_acc", "harness_acc_norm")]
        row = "| {} | {:.2f} / {:.2f} | {:.2f} / {:.2f} |"
        lines += ["", f"HellaSwag ({last['hellaswag_examples']:,} examples), acc / acc_norm in percent:", "",
                  "| model | completion | harness |", "| --- | --- | --- |", row.format("this run", *ours),
                  row.format("GPT-2 124M (published)", *GPT2_124M_REFERENCE)]  # fmt: skip
    lines += ["", "![train and val loss](loss.png)"]
    samples = next((r["samples"] for r in reversed(records) if "samples" in r), [])
    if samples:
        prompt = config.get("sample_prompt", "")
        lines += ["", f"Samples at step {last['step']}:"]
        lines += [line for text in samples for line in ("", f"> {prompt}{text}".replace("\n", " "))]
    with atomic_write(report_path, "w") as f:
        f.write("\n".join(lines) + "\n")


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
    if any(r.get("event") == "finished" for r in read_jsonl(args.log) if isinstance(r, dict)):
        report = os.path.join(os.path.dirname(args.log), "report.md")
        write_report(args.log, report)
        print(f"wrote {report}")


if __name__ == "__main__":
    run_cli(main)
