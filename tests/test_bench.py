"""bench.py gpu: the one command that checks the GPU path, run small on the CPU."""

import json

from conftest import cli, ok

CHECKS = [
    "reference_step",
    "short_run_parity",
    "kill_and_resume",
    "hellaswag_in_training_equals_hellaswag_py",
    "hellaswag_full_pass",
    "sample_kv_cache",
    "larger_presets_fit",
]


def test_bench_gpu_quick_on_the_cpu_passes_every_check_and_writes_the_report_with_a_profile(tmp_path):
    out = tmp_path / "r.json"
    r = ok(cli("bench.py", "gpu", "--device", "cpu", "--quick", "--profile", "--out", out))
    report = json.loads(out.read_text())
    assert {"device", "tokens_per_sec", "mfu", "checks"} <= set(report)
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    assert report["tokens_per_sec"] > 0 and report["mfu"] is None  # no MFU without a known GPU's peak
    reference = report["checks"][0]
    assert [(v["micro_batch"], v["compiled"]) for v in reference["variants"]] == [(4, True), (4, False), (2, True)]
    assert reference["compile_backend"] == "aot_eager"  # --quick on a CPU: the wiring, without inductor's C++
    resume = report["checks"][2]
    assert resume["killed_after_step"] < 5 and resume["max_abs_diff"] == 0.0  # on a CPU the resume is bit for bit
    assert report["checks"][3]["in_training"] == report["checks"][3]["hellaswag_py"]
    assert "7 checks" in r.stdout and "FAIL" not in r.stdout
    # --profile: where the reference step's time goes, most first, as shares of the time measured
    profile = reference["profile"]
    assert profile["sort_by"] == "self_cpu_time_total" and profile["steps"] == 2 and profile["total_ms_per_step"] > 0
    shares = [op["share"] for op in profile["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    names = [op["name"] for op in profile["top"]]
    assert any(name in names for name in ("aten::mm", "aten::addmm", "aten::bmm")), names  # the matmuls show
    assert all(op["calls"] >= 1 and op["self_ms_per_step"] > 0 for op in profile["top"])
    assert "where a step's" in r.stdout and "the top 10:" in r.stdout
    assert len(reference["variants"]) == 3 and "profile" not in reference["variants"][0]
    sampling = report["checks"][5]  # the compiled step decodes greedily as the eager one does
    assert sampling["greedy_equal"] and min(sampling[k] for k in SAMPLING_RATES) > 0


SAMPLING_RATES = ("compiled_tokens_per_sec", "tokens_per_sec", "uncached_tokens_per_sec")


def test_bench_sample_prints_compiled_uncompiled_and_uncached_side_by_side(tiny_checkpoint):
    # the shape of test_sample's compiled model and a full 64-token cache: inductor compiles the step once for both
    model = tiny_checkpoint(block_size=64)
    r = ok(cli("bench.py", "sample", "--model", model, "--new-tokens", 56, "--device", "cpu"))
    rates = {
        line.rsplit(None, 2)[0].strip(): float(line.split()[-2])
        for line in r.stdout.splitlines()
        if line.endswith(" tokens/s")
    }
    assert set(rates) == {"compiled step, KV cache", "uncompiled, KV cache", "uncompiled, no cache"}, r.stdout
    assert all(rate > 0 for rate in rates.values())
    ratios = next(line for line in r.stdout.splitlines() if line.startswith("compile speedup: "))
    compile_speedup = float(ratios.split("compile speedup: ")[1].split("x")[0])
    cache_speedup = float(ratios.split("cache speedup: ")[1].split("x")[0])
    # the ratios are of the rates in the table above them, measured in the same run
    assert abs(compile_speedup - rates["compiled step, KV cache"] / rates["uncompiled, KV cache"]) < 0.01
    assert abs(cache_speedup - rates["uncompiled, KV cache"] / rates["uncompiled, no cache"]) < 0.01
    assert ratios.endswith("greedy tokens compiled = uncompiled: True")
    assert "measuring the compiled step (inductor) on the KV cache: a warm-up, then 2 x 56 tokens ..." in r.stdout


def test_bench_gpu_on_a_machine_without_a_gpu_says_so_before_the_full_size_checks(tmp_path, monkeypatch):
    import bench

    def stop(*args):
        raise KeyboardInterrupt  # the first full-size work: as far as this test goes

    monkeypatch.setattr(bench, "write_pydocs_shards", stop)
    r = cli("bench.py", "gpu", "--device", "cpu", "--out", tmp_path / "r.json")
    assert r.returncode == 130 and r.stdout.startswith("note: no GPU here, CPU (") and "--quick checks" in r.stdout


def test_bench_download_prints_local_and_wan_side_by_side_with_requests_per_row_group():
    r = ok(cli("bench.py", "download", "--tokens", 1_000_000, "--repeats", 1, "--connections", 4))
    lines = r.stdout.splitlines()
    rates = {line.split()[0]: float(line.split()[1]) for line in lines if len(line.split()) == 2}  # the table
    assert rates["local"] > 0 and rates["WAN"] > 0
    corpus = next(line for line in lines if line.startswith("corpus: "))
    files, row_groups = int(corpus.split()[1]), int(corpus.split(", ")[1].split()[0])
    per_row_group = next(line for line in lines if line.startswith("per row group over the WAN: "))
    requests = float(per_row_group.split(": ")[1].split(" requests")[0])
    assert requests == round((row_groups + 2 * files) / row_groups, 2), per_row_group  # + a redirect and a tail a file
    ratio = next(line for line in lines if line.startswith("download ratio: "))
    times_local = float(ratio.split("(WAN ")[1].split("x local")[0])
    assert abs(times_local - rates["WAN"] / rates["local"]) < 0.02 and "--connections 4" in r.stdout
