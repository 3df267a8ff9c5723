"""The benchmark harness on CPU: `bash bench/gpu.sh --device cpu` is `bench_sft.py --gpu-table --device cpu`."""

import re
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_sft  # noqa: E402


def test_gpu_table_cpu_mode_writes_the_table(tmp_path, monkeypatch):
    """The systems of the GPU table train on the tiny shapes and land in one Markdown table with our ratios. They
    run in this process, not one process each as in gpu.sh (their imports would cost a minute here), and without
    ours_compile (dynamo's tracing would add ~10 s; compiled blocks are tested in test_model and test_sharding)."""
    assert 'bench_sft.py --gpu-table --device "$device"' in (ROOT / "bench/gpu.sh").read_text()
    monkeypatch.setattr(bench_sft, "launch", lambda argv, system: bench_sft.main(argv + ["--run", system]))
    out = tmp_path / "table.md"
    systems = [s for s in bench_sft.GPU_SYSTEMS.split(",") if s != "ours_compile"]
    bench_sft.main(["--gpu-table", "--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(out),
                    "--systems", ",".join(systems)])
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| system")]
    rows = {r[0]: r[1:] for r in cells}
    assert [name.split(" (")[0] for name in rows] == systems
    for name, (model, tokens_per_s, mfu, peak_gib, ratio) in rows.items():
        assert float(tokens_per_s) > 0 and float(peak_gib) > 0 and mfu == "–"  # no MFU without a GPU's peak
        assert re.fullmatch(r"\d+\.\d\dx", ratio) if "lora" not in name else ratio == "–"
    assert rows["ours"][4] == "1.00x" and rows["ours_lora"][0] == "tiny, LoRA r=16"
    bash = subprocess.run(["bash", "-n", str(ROOT / "bench/gpu.sh")], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr  # the script parses
