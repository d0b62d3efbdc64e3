"""tools/bench_decode.py on the CPU (the device stands in): every measurement runs, its results
have the documented structure, and facts that hold on any device hold here."""

from __future__ import annotations

import json
import subprocess
import sys

from maescale.devtools.decode_bench import format_decode_tables, run_decode_benchmark
from tests.data.conftest import write_jpeg_shards
from tests.helpers import REPO


def test_decode_benchmark_runs_on_cpu(tmp_path):
    res = run_decode_benchmark(device="cpu", sets=((96, 72),), batch_size=8, img_size=32, repeats=1,
                               agree_images=6, feed_steps=2, workdir=str(tmp_path / "work"))
    assert res["errors"] == {}, res["errors"]
    e = res["sets"]["96x72"]
    for phase in ("decode", "crop_resize", "normalize", "total", "per_image_crop_resize_before"):
        assert e["device_ms"][phase]["median_ms"] > 0
    ours = e["launches"]["crop_resize_normalize"]["kernel_ops"]
    assert 0 < ours <= 40 and e["launches"]["per_image_crop_resize_before"]["kernel_ops"] > ours
    a = e["agreement"]
    assert a["sampling"] == ["4:2:0"]
    assert a["decoder_vs_libjpeg_fancy_chroma"]["max"] == 0  # on the CPU the "device" decoder is libjpeg-turbo
    assert a["decoder_vs_libjpeg_replicated_chroma"]["max"] > 0
    assert a["420_vs_cpu_plain"]["mean"] < 1
    w = e["worker"]
    for key in ("gpu_decode", "cpu_decode_fast", "cpu_decode_plain"):
        assert w[key]["ms_per_image"] > 0
        assert abs(w[key]["images_per_s_per_core"] * w[key]["ms_per_image"] - 1000) < 1
    assert res["feed_overlap"]["images_same_as_sync"] is True
    table = format_decode_tables(res)
    assert "| 96x72 |" in table and "Feed overlap" in table


def test_bench_decode_cli_reports_a_bad_device(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools/bench_decode.py"), "--device", "cpu", "--sets", "bad"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "expected WxH" in proc.stderr
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools/bench_decode.py"), "--device", "cpu", "--sets", "64x48",
                           "--batch-size", "4", "--img-size", "16", "--repeats", "1", "--agree-images", "2",
                           "--no-feed-check", "--json", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["settings"]["batch_size"] == 4
    assert "Agreement with the CPU path" in proc.stdout


def test_worker_process_cpu_is_measured_in_the_worker(tmp_path):
    from maescale.devtools.data_bench import bench_gpu_decode_worker, bench_worker_process_cpu

    shards = write_jpeg_shards(tmp_path / "s", count=32, sizes=[(200, 150)])
    for gpu in (True, False):
        in_process, decode = bench_gpu_decode_worker(shards, 32, img_size=32, batch_size=8, gpu_decode=gpu)
        assert in_process > 0 and decode == 0  # no device decode unless asked for
        assert bench_worker_process_cpu(shards, 32, img_size=32, batch_size=8, gpu_decode=gpu) > 0
