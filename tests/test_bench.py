"""bench.py gpu: the one command that checks the GPU path, run small on the CPU."""

import json

from conftest import run_script

CHECKS = [
    "reference_step",
    "short_run_parity",
    "kill_and_resume",
    "hellaswag_in_training_equals_hellaswag_py",
    "hellaswag_full_pass",
    "sample_kv_cache",
    "larger_presets_fit",
]


def test_bench_gpu_quick_on_the_cpu_passes_every_check_and_writes_the_report(tmp_path):
    out = tmp_path / "r.json"
    r = run_script("bench.py", "gpu", "--device", "cpu", "--quick", "--out", out, timeout=900)  # about 1 min alone
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "tokens_per_sec", "mfu", "checks"} <= set(report)
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    assert report["tokens_per_sec"] > 0 and report["mfu"] is None  # no MFU without a known GPU's peak
    reference = report["checks"][0]
    assert [(v["micro_batch"], v["compiled"]) for v in reference["variants"]] == [(8, True), (8, False), (4, True)]
    resume = report["checks"][2]
    assert resume["killed_after_step"] < 19 and resume["max_abs_diff"] == 0.0  # on a CPU the resume is bit for bit
    assert report["checks"][3]["in_training"] == report["checks"][3]["hellaswag_py"]
    assert "7 checks" in r.stdout and "FAIL" not in r.stdout
