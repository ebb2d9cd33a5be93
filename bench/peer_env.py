"""The peers' virtualenv and the subprocess that runs ``bench/peers.py`` in it.

River 0.26 needs numpy>=2.2.5 and olrec needs numpy<2, so River and Vowpal Wabbit live
in ``<root>/.venv-peers`` (git-ignored). Imported by the main-venv benchmark: stdlib only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Exact versions, so a peer's figure can be reproduced; changing one rebuilds the venv.
PEER_PINS = (
    "river==0.26.1",
    "vowpalwabbit==9.11.9",
    "scikit-learn==1.9.1",
    "pyarrow==26.0.1",
    "numpy==2.4.6",
)
# Progressive AUC on MovieLens-100K measured with these peers' standard features. A peer
# that lands well below was set up badly, and every comparison against it means nothing.
REFERENCE_AUC = {"vw-linear": 0.763, "river-logreg": 0.748, "river-fm": 0.741, "vw-lrq": 0.738}
REFERENCE_TOLERANCE = 0.005
_STAMP = ".olrec-peers-stamp"


def _log(msg: str) -> None:
    print(f"peer_env: {msg}", file=sys.stderr, flush=True)


def ensure_peers_venv(root: Path) -> Path:
    """Build ``root/.venv-peers`` unless a complete one with these pins exists; its python."""
    venv = root / ".venv-peers"
    python = venv / "bin" / "python"
    want = "\n".join(PEER_PINS) + "\n"
    stamp = venv / _STAMP
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    if venv.exists():  # half-built (no stamp) or other pins: start clean
        _log(f"rebuilding {venv} (missing stamp or pins changed)")
        shutil.rmtree(venv)
    _log(f"creating {venv} with {', '.join(PEER_PINS)}")
    # sys.executable is a venv python; `-m venv` builds from its base interpreter (same 3.11).
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # pip's stdout goes to fd 2 so the caller's stdout stays clean for its own output.
    subprocess.run([str(python), "-m", "pip", "install", "--progress-bar", "off", *PEER_PINS],
                   check=True, stdout=2, env=_child_env())
    stamp.write_text(want)  # only after pip succeeded
    _log("peers venv ready")
    return python


def _child_env() -> dict[str, str]:
    # The main venv's paths must not leak into the peers' interpreter (numpy 1 vs 2).
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run_peers(events_path: Path, systems: list[str], *, check_reference: bool, root: Path) -> list[dict]:
    """Run ``systems`` on the events parquet by progressive validation; their records.

    Each record: system, auc, logloss, auc_second_half, events_per_s, lr (the best of
    the sweep), sweep {lr: auc}. ``check_reference`` (MovieLens-100K only) raises
    ``RuntimeError`` if a peer's AUC is more than ``REFERENCE_TOLERANCE`` below its reference.
    """
    python = ensure_peers_venv(root)
    script = Path(__file__).with_name("peers.py")
    with tempfile.TemporaryDirectory(prefix="olrec-peers-") as tmp:
        out = Path(tmp) / "records.json"
        # stderr is inherited, so the per-(system, lr) progress lines stream through.
        proc = subprocess.run([str(python), str(script), "--events", str(events_path),
                               "--systems", ",".join(systems), "--out", str(out)], env=_child_env())
        if proc.returncode != 0:
            raise RuntimeError(f"{script} exited with status {proc.returncode} for systems {systems} "
                               f"on {events_path}; its stderr is above")
        records: list[dict] = json.loads(out.read_text())
    if check_reference:
        bad = [f"{r['system']} AUC {r['auc']:.4f} < reference {REFERENCE_AUC[r['system']]:.3f} "
               f"- {REFERENCE_TOLERANCE}" for r in records
               if r["system"] in REFERENCE_AUC and not r["auc"] >= REFERENCE_AUC[r["system"]] - REFERENCE_TOLERANCE]
        if bad:
            raise RuntimeError("peer set up badly, comparisons against it would mean nothing: " + "; ".join(bad))
    return records
