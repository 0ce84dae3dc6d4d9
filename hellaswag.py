"""
HellaSwag (https://rowanzellers.com/hellaswag): pick the right one of 4 endings of a short context, by likelihood.
Scores both published conventions in one run, since papers and repos mix them up:

- completion (build-nanogpt, llm.c): context encode(ctx), endings encode(" " + ending); acc takes the ending with the
  lowest summed loss, acc_norm the lowest loss per token.
- harness (lm-eval-harness `hellaswag`, the numbers on the Open LLM leaderboard): the query is the activity label, ctx_a
  and ctx_b (capitalised), cleaned of WikiHow's [title] / [step] markup; acc takes the highest summed log-likelihood,
  acc_norm the highest log-likelihood per character of the ending.

    python hellaswag.py --model gpt2                      # OpenAI's GPT-2 124M from the Hugging Face hub
    python hellaswag.py --model log/ --out results.json   # the newest checkpoint of a training run
    torchrun --standalone --nproc_per_node 8 hellaswag.py --model gpt2-xl
"""

import json
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import atomic_write, check_output_path, when_gone, write_json
from http_files import HTTPClient, HTTPFile, Retry
from model import GPT2_VOCAB_SIZE
from utils import (
    UserError,
    check_flags,
    config_parser,
    get_tokenizer,
    is_cuda,
    pick_device,
    run_cli,
)
from weights import load_model

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_VAL_EXAMPLES = 10_042
# published scores (percent): completion acc, acc_norm, harness acc, acc_norm
REFERENCES = {"GPT-2 124M": (28.59, 29.55, 28.92, 31.14), "GPT-2 XL 1558M": (38.42, 48.93, 40.04, 50.89)}


@dataclass
class Config:
    model: str = "gpt2"  # our checkpoint (.pt), an out dir (its newest one), a transformers dir, or gpt2 ... gpt2-xl
    data_file: str = ""  # a local hellaswag_val.jsonl; without it the official file is downloaded once into --cache-dir
    cache_dir: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")  # where the download is kept
    limit: int = 0  # score only the first N examples (0: all)
    batch_size: int = 32  # examples per forward pass (8 rows each: 4 endings x 2 conventions)
    device: str = "auto"  # cuda, cpu, mps or auto
    out: str = ""  # write the results as JSON here


# ----------------------------------------------------------------------------------------------------------------
# data


def download(cache_dir, url=URL, retry=None):
    """The official validation set, fetched once."""
    path = os.path.join(cache_dir, "hellaswag_val.jsonl")
    if os.path.exists(path):
        return path
    try:
        with HTTPClient(retry or Retry(attempts=5), connections=1) as client, HTTPFile(url, client) as remote:
            data = remote.read(remote.size)  # a dropped connection resumes where it broke
    except UserError as e:
        raise UserError(f"{e}: with no network, pass a local copy of HellaSwag with --data-file") from e
    try:
        os.makedirs(cache_dir, exist_ok=True)  # only now: a failed download leaves no empty folder behind
        with atomic_write(path) as f:
            f.write(data)
    except OSError as e:
        raise UserError(f"cannot save HellaSwag in --cache-dir {cache_dir}: {e.strerror}") from e
    return path


def examples_on_every_rank(data_file, limit, master_process):
    """The examples for a training run, read (and downloaded once) by rank 0 alone and sent to every rank: nodes need
    no shared filesystem. None on every rank, with one warning, when the file cannot be had."""
    examples = [None]
    if master_process:
        try:
            examples = [load_examples(data_file or download(Config.cache_dir), limit)]
        except UserError as e:
            print(f"warning: HellaSwag is skipped: {e}", file=sys.stderr)
    if dist.is_initialized():
        dist.broadcast_object_list(examples, src=0)  # plain text: pickled, in one message
    return examples[0]


def load_examples(path, limit=0):
    """HellaSwag jsonl examples, each checked for the fields the scorers read."""
    if not os.path.isfile(path):
        raise UserError(f"HellaSwag file {path} " + ("is not a file" if os.path.exists(path) else "does not exist"))
    examples = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                ex = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {line_no}: not UTF-8 text") from e
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {line_no}: not JSON ({e.msg})") from e
            if not isinstance(ex, dict):
                raise UserError(f"{path} line {line_no}: not a JSON object")
            for key in ("ctx", "ctx_a", "ctx_b", "activity_label"):
                if not isinstance(ex.get(key), str):
                    raise UserError(f"{path} line {line_no}: field {key!r} is missing or not a string")
            endings = ex.get("endings")
            if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
                raise UserError(f"{path} line {line_no}: field 'endings' must be a list of 4 strings")
            if ex.get("label") not in (0, 1, 2, 3, "0", "1", "2", "3"):
                raise UserError(f"{path} line {line_no}: field 'label' must be 0, 1, 2 or 3, got {ex.get('label')!r}")
            examples.append(ex)
            if len(examples) == limit:
                break
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def preprocess(text):
    """lm-eval-harness's cleaning of HellaSwag's WikiHow markup."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def build_rows(example, enc):
    """The 8 rows to score for one example: (tokens, number of final tokens to score). The first 4 rows are the
    completion convention's endings, the last 4 the harness convention's."""
    rows = []
    ctx = enc.encode_ordinary(example["ctx"])
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)
        rows.append((ctx + end, len(end)))
    query = preprocess(example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize())
    query_tokens = enc.encode_ordinary(query)
    for ending in example["endings"]:
        # the harness encodes query and choice together and scores what follows the query's own tokens
        whole = enc.encode_ordinary(query + " " + preprocess(ending))
        rows.append((whole, len(whole) - len(query_tokens)))
    return rows


def synthetic_examples(n, seed=0):
    """HellaSwag-format examples of random words, for checks without the network: with the WikiHow markup ([title],
    [step], double spaces) that the harness convention cleans up, and, like the real set, half short ActivityNet-style
    contexts and endings, half long WikiHow-style ones."""
    rng = random.Random(seed)
    words = "the a person man woman dog ball water is are runs jumps holds takes into onto with then and slowly".split()

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    examples = []
    for i in range(n):
        wikihow = i % 2 == 1
        ctx_a = text(30, 90) + " [title] How to " + text(2, 4) + "." if wikihow else text(6, 20)
        ctx_b = text(0, 8) + rng.choice(["", "  " + text(1, 3), " [step] " + text(2, 4)])
        lo, hi = (15, 45) if wikihow else (6, 20)
        endings = [
            text(lo, hi) + rng.choice([".", " [substeps] " + text(2, 5) + ".", "  " + text(1, 4)]) for _ in range(4)
        ]
        examples.append(
            dict(
                ind=i,
                activity_label=text(1, 3).capitalize(),
                ctx_a=ctx_a,
                ctx_b=ctx_b,
                ctx=(ctx_a + " " + ctx_b).strip(),
                endings=endings,
                label=rng.randrange(4),
                split="val",
            )
        )
    return examples


# ----------------------------------------------------------------------------------------------------------------
# scoring


def token_logprobs(hidden, targets, head):
    """log p(target) at each position: the target's logit minus the log of the softmax's normaliser over the vocab.
    The head (the padded vocabulary rows cut off: they are not tokens) is applied in tiles of positions x vocabulary
    whose logits stay in cache on a CPU; the normaliser is the logsumexp of the tiles' logsumexps. In fp32 always."""
    on_cpu = hidden.device.type == "cpu"
    positions_per_tile, vocab_per_tile = (1024, 1024) if on_cpu else (8192, len(head))
    out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
    for i in range(0, len(hidden), positions_per_tile):
        h = hidden[i : i + positions_per_tile]  # (P, n_embd)
        tile_lse = [
            torch.logsumexp(F.linear(h, head[v : v + vocab_per_tile]), dim=-1)
            for v in range(0, len(head), vocab_per_tile)
        ]
        target_logits = (h * head[targets[i : i + positions_per_tile]]).sum(dim=-1)  # (P,)
        out[i : i + positions_per_tile] = target_logits - torch.logsumexp(torch.stack(tile_lse, dim=-1), dim=-1)
    return out


@torch.inference_mode()
def score_rows(model, rows, device, rows_per_batch, stop=lambda: False):
    """Summed log-probability of each row's scored tokens given everything before them, and their count.
    Rows of similar length are batched together and right-padded: with causal attention the padding after a row
    cannot change it. The head runs only where a scored token is predicted, not over the contexts. stop() is asked
    before each batch: a training run's stop signal ends the scoring there (its result is then not used)."""
    block_size = model.config.block_size
    rows = [(tokens[-(block_size + 1) :], min(n, block_size)) for tokens, n in rows]  # keep the end if too long
    logprob_sums = torch.zeros(len(rows), dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(order), rows_per_batch):
        if stop():
            break
        batch = order[start : start + rows_per_batch]
        T = max(len(rows[i][0]) for i in batch) - 1
        idx = torch.zeros(len(batch), T, dtype=torch.long)
        targets = torch.zeros(len(batch), T, dtype=torch.long)
        scored = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, i in enumerate(batch):
            tokens, n = rows[i]
            L = len(tokens) - 1
            idx[b, :L] = torch.tensor(tokens[:-1])
            targets[b, :L] = torch.tensor(tokens[1:])
            scored[b, L - n : L] = True
        idx, targets, scored = idx.to(device), targets.to(device), scored.to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=is_cuda(device)):
            hidden = model.hidden_states(idx)[scored]  # (n_scored, n_embd)
        logprobs = token_logprobs(hidden.float(), targets[scored], model.lm_head.weight[:GPT2_VOCAB_SIZE])
        row_of_token = torch.arange(len(batch), device=device).unsqueeze(1).expand_as(scored)[scored]
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
            0, row_of_token, logprobs.double()
        )
        logprob_sums[batch] = sums.cpu()
    return logprob_sums, torch.tensor([n for _, n in rows], dtype=torch.float64)


def predict(example, logprob_sums, n_tokens):
    """The 4 predictions (completion acc, acc_norm, harness acc, acc_norm) of one example from its 8 row scores."""
    completion, harness = logprob_sums[:4], logprob_sums[4:]
    chars = torch.tensor([len(preprocess(e)) for e in example["endings"]], dtype=torch.float64)
    return (
        int(completion.argmax()),  # lowest summed loss
        int((completion / n_tokens[:4]).argmax()),  # lowest loss per token
        int(harness.argmax()),  # highest summed log-likelihood
        int((harness / chars).argmax()),  # highest log-likelihood per character
    )


def evaluate(model, examples, device, batch_size=32, ddp_rank=0, ddp_world_size=1, stop=lambda: False):
    """Scores on the examples in both conventions, as fractions. Each rank scores every ddp_world_size-th example;
    the counts are summed over ranks, so the result equals a single process's."""
    if batch_size < 1:  # a batch of no rows would score nothing and report it as 100%
        raise UserError(f"the HellaSwag batch size must be at least 1, got {batch_size}")
    enc = get_tokenizer()
    mine = examples[ddp_rank::ddp_world_size]
    rows = [row for ex in mine for row in build_rows(ex, enc)]
    counts = torch.zeros(5, dtype=torch.long)  # examples, correct per (acc, acc_norm, harness_acc, harness_acc_norm)
    if mine:
        logprob_sums, n_tokens = score_rows(model, rows, device, batch_size * 8, stop)
        for i, ex in enumerate(mine):
            predictions = predict(ex, logprob_sums[8 * i : 8 * i + 8], n_tokens[8 * i : 8 * i + 4])
            counts[0] += 1
            counts[1:] += torch.tensor([p == int(ex["label"]) for p in predictions])
    if ddp_world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        counts = counts.cpu()
    n = int(counts[0])
    acc, acc_norm, harness_acc, harness_acc_norm = (c / n for c in counts[1:].tolist())
    return dict(examples=n, acc=acc, acc_norm=acc_norm, harness_acc=harness_acc, harness_acc_norm=harness_acc_norm)


def format_table(results, name):
    lines = [f"{'':<22}{'completion acc / acc_norm':>28}{'harness acc / acc_norm':>26}"]
    ours = [100 * results[k] for k in ("acc", "acc_norm", "harness_acc", "harness_acc_norm")]
    for label, (a, an, ha, han) in [(name, ours), *REFERENCES.items()]:
        lines.append(f"{label[:22]:<22}{a:>18.2f} / {an:6.2f}{ha:>16.2f} / {han:6.2f}")
    return "\n".join(lines)


def main(argv=None):
    args = Config(**vars(config_parser(Config, __doc__).parse_args(argv)))
    check_flags(args, "at least 1", lambda v: v >= 1, "batch_size")
    check_flags(args, "0 or more", lambda v: v >= 0, "limit")
    if args.out:
        check_output_path(args.out, "--out")
    device = pick_device(args.device)
    ddp_rank, ddp_world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if ddp_world_size > 1:  # under torchrun: every process scores its share of the examples
        if is_cuda(device):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        when_gone(os.getppid(), lambda: os.kill(os.getpid(), signal.SIGTERM))  # torchrun killed: end, not score on
        dist.init_process_group(backend="nccl" if is_cuda(device) else "gloo",
                                device_id=torch.device(device) if is_cuda(device) else None)  # fmt: skip
    data_file = args.data_file or download(args.cache_dir)
    examples = load_examples(data_file, args.limit)
    model = load_model(args.model, device)
    if ddp_rank == 0:
        print(f"scoring {len(examples):,} examples on {ddp_world_size} x {device}", flush=True)
    t0 = time.time()
    results = evaluate(model, examples, device, args.batch_size, ddp_rank, ddp_world_size)
    results.update(
        seconds=round(time.time() - t0, 2),
        model=args.model,
        data_file=data_file,
        world_size=ddp_world_size,
        config=asdict(args),
    )
    if ddp_rank == 0:
        print(format_table(results, f"{os.path.basename(os.path.normpath(args.model))} ({results['examples']:,} ex)"))
        print(f"{results['examples']:,} examples in {results['seconds']:.1f} s on {ddp_world_size} x {device}")
        if args.out:
            write_json(args.out, results)
    if ddp_world_size > 1:
        dist.barrier()  # rank 0 has written its results: a rank that left before would abort it
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
