"""The committed gRPC stubs are what ``make proto`` generates from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "olrec/v1/recommender.proto"
STUBS = ("recommender_pb2.py", "recommender_pb2.pyi", "recommender_pb2_grpc.py")


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'serve/proto'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "serve/proto" / PROTO)],
                   check=True)
    for name in STUBS:
        fresh = (tmp_path / "olrec/v1" / name).read_text()
        committed = (ROOT / "olrec/v1" / name).read_text()
        assert committed == fresh, f"olrec/v1/{name} is stale: run `make proto` and commit it"


def test_the_service_has_its_three_methods() -> None:
    from olrec.v1 import recommender_pb2

    service = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"]
    assert [m.name for m in service.methods] == ["Recommend", "Score", "Feedback"]
