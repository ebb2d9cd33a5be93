"""What a replica's row precision costs: AUC and bytes per row for fp32, fp16 and int8 rows.

Learns the first 80% of MovieLens-100K in process (``learn_into_run``), then
serves the checkpoint three times, once per row precision (``ServeConfig.rows``),
and scores the last 20% through the replica's model (mirrored rows, dense
weights from the checkpoint). The dense tower is fp32 here: this isolates the rows.

    .venv/bin/python bench/rows.py [--data ../shared/data/ml-100k] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from olrec.features import encode, ml100k_spec
from olrec.learner import LearnerConfig
from olrec.metrics import auc
from olrec.serving import ServeConfig, ServingModel
from olrec.sources import read_ml100k
from olrec.train import learn_into_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k")
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args()
    events, spec = read_ml100k(args.data), ml100k_spec()
    split = int(events.num_rows * 0.8)
    test = encode(events.slice(split), spec)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        learn_into_run(events.slice(0, split), spec, LearnerConfig(), tmp)
        for rows in ("fp32", "fp16", "int8"):
            model = ServingModel(ServeConfig(run_dir=tmp, rows=rows))
            model.apply(model.read_update())
            sparse = model.mirrors["sparse"]
            score = float(auc(test.label, model.snapshot.learner.predict(test)))
            records.append({"rows": rows, "auc": score, "bytes_per_row": sparse.nbytes / (len(sparse) + 1)})
    base = records[0]["auc"]
    print(f"{'rows':6} {'AUC last 20%':>13} {'vs fp32':>9} {'bytes/row':>10}   (sparse rows, dim + 1 = 5, id map included)")
    for r in records:
        r["auc_delta"] = r["auc"] - base
        print(f"{r['rows']:6} {r['auc']:13.6f} {r['auc_delta']:+9.6f} {r['bytes_per_row']:10.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
