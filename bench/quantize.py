"""fp32 against int8 ONNX of the dense tower, for three tower sizes, in one run.

    python bench/quantize.py [--events ../shared/data/ml-100k] [--json out.json]

Per tower (``--hidden``): train the in-process learner on the first 80% of
MovieLens-100K, export the tower, and quantize it three ways:

- ``static``: what :func:`olrec.export.quantize_int8` ships (QDQ, per-tensor
  scales calibrated on the last training batch; MLP layers only);
- ``dynamic``: onnxruntime's dynamic quantization of the same layers;
- ``static+reads``: static, with the prior and linear reads quantized too.

Printed: int8/fp32 file size; onnxruntime latency (one thread, batch of 100,
median of interleaved rounds: this machine is noisy) and the speedup; AUC on
the last 20% of the full model (counters, wide part, blend) and of the deep
logit alone, fp32 against int8; ``batch dep``: the largest change of a logit
when its 100 rows are scored inside a batch of 300 whose other rows span a
wider range (Triton batches concurrent requests together).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from olrec.export import export_onnx, quantize_int8, session
from olrec.features import encode, ml100k_spec
from olrec.learner import LearnerConfig, OnlineLearner
from olrec.metrics import auc
from olrec.sources import read_ml100k

ROOT = Path(__file__).resolve().parents[1]

TOWERS = [(32,), (256, 128), (512, 256)]


class _Reader(CalibrationDataReader):
    def __init__(self, emb: np.ndarray, num: np.ndarray) -> None:
        self.feeds = iter([{"emb": emb, "num": num}])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def _alternatives(fp32: Path, out: Path, calibration: tuple[np.ndarray, np.ndarray]) -> dict[str, Path]:
    gemms = [n.name for n in onnx.load(fp32).graph.node if n.op_type == "Gemm"]
    mlp = [g for g in gemms if not g.startswith(("/prior/", "/linear/"))]
    # quantize_dynamic rewrites each Gemm `g` as `g_MatMul` + `g_Add` before quantizing.
    quantize_dynamic(fp32, out / "dynamic.onnx", weight_type=QuantType.QInt8, nodes_to_quantize=[f"{g}_MatMul" for g in mlp])
    quantize_static(fp32, out / "reads.onnx", _Reader(*calibration), quant_format=QuantFormat.QDQ, nodes_to_quantize=gemms,
                    per_channel=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    for name in ("dynamic.onnx", "reads.onnx"):  # as quantize_int8 does: shape annotations out
        m = onnx.load(out / name)
        del m.graph.value_info[:]
        onnx.save(m, out / name)
    return {"dynamic": out / "dynamic.onnx", "static+reads": out / "reads.onnx"}


def _latencies(paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int, runs: int = 100) -> dict[str, float]:
    sessions = {k: session(p) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(runs):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            times[k].append((time.perf_counter() - t0) / runs)
    return {k: float(np.median(v)) * 1e6 for k, v in times.items()}


def bench_tower(events, hidden: tuple[int, ...], work: Path, rounds: int) -> list[dict]:
    spec, cfg = ml100k_spec(), LearnerConfig(hidden=hidden)
    learner = OnlineLearner(spec, cfg)
    split = int(events.num_rows * 0.8)
    train = encode(events.slice(0, split), spec)
    learner.learn(train)
    cal = tuple(x.numpy() for x in learner.ranking_inputs(train.slice(split - cfg.batch_size, split))[:2])
    test = encode(events.slice(split), spec)
    emb_t, num_t, p_wide = learner.ranking_inputs(test)
    emb, num = emb_t.numpy(), num_t.numpy()

    work.mkdir(parents=True)
    fp32 = export_onnx(learner.model, work / "fp32.onnx")
    paths = {"fp32": fp32, "static": quantize_int8(fp32, work / "static.onnx", cal), **_alternatives(fp32, work, cal)}
    lat = _latencies(paths, {"emb": emb[:100], "num": num[:100]}, rounds)
    wide = {"emb": np.concatenate([emb[:100], emb[100:300] * 5]), "num": np.concatenate([num[:100], num[100:300] * 5])}
    scores = {}
    for k, p in paths.items():
        s = session(p)
        logit = s.run(["logit"], {"emb": emb, "num": num})[0]
        alone = s.run(["logit"], {"emb": emb[:100], "num": num[:100]})[0]
        batched = s.run(["logit"], wide)[0][:100]
        scores[k] = (auc(test.label, learner.blend_probs(torch.from_numpy(logit), p_wide)), auc(test.label, logit),
                     float(np.abs(alone - batched).max()))
    size32 = fp32.stat().st_size
    return [{"hidden": list(hidden), "method": k, "fp32_bytes": size32, "int8_bytes": paths[k].stat().st_size,
             "size_ratio": paths[k].stat().st_size / size32,
             "latency_us_fp32": lat["fp32"], "latency_us_int8": lat[k], "speedup": lat["fp32"] / lat[k],
             "auc_fp32": scores["fp32"][0], "auc_int8": scores[k][0], "auc_delta": scores[k][0] - scores["fp32"][0],
             "deep_auc_fp32": scores["fp32"][1], "deep_auc_int8": scores[k][1], "batch_dep": scores[k][2]}
            for k in paths if k != "fp32"]


def table(records: list[dict]) -> str:
    head = (f"{'tower':<11} {'int8':<13} {'size':>6} {'fp32 us':>8} {'int8 us':>8} {'speedup':>7} "
            f"{'AUC fp32':>8} {'AUC int8':>8} {'delta':>8} {'deep fp32':>9} {'deep int8':>9} {'batch dep':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{str(tuple(r['hidden'])):<11} {r['method']:<13} {r['size_ratio']:>6.3f} {r['latency_us_fp32']:>8.1f} "
                     f"{r['latency_us_int8']:>8.1f} {r['speedup']:>6.2f}x {r['auc_fp32']:>8.4f} {r['auc_int8']:>8.4f} "
                     f"{r['auc_delta']:>+8.5f} {r['deep_auc_fp32']:>9.4f} {r['deep_auc_int8']:>9.4f} {r['batch_dep']:>9.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k",
                    help="the MovieLens-100K directory")
    ap.add_argument("--hidden", default=";".join(",".join(map(str, h)) for h in TOWERS),
                    help="towers' hidden sizes, ';' between towers (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds of 100 runs (default 15)")
    ap.add_argument("--json", type=Path, help="write the records here as a JSON list")
    args = ap.parse_args(argv)
    towers = [tuple(int(x) for x in h.split(",")) for h in args.hidden.split(";") if h]
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice to pre-process, per call
    events = read_ml100k(args.events)
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="olrec-quantize-") as tmp:
        for i, hidden in enumerate(towers):
            records += bench_tower(events, hidden, Path(tmp) / str(i), args.rounds)
    print(table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
