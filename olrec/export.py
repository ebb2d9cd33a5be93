"""The dense ranking tower as ONNX (fp32, int8) and as Triton model repositories.

One ONNX file serves two Tritons (see :func:`write_model_repos`): a stock
server on Kubernetes runs it with the onnxruntime backend; locally, where the
server bundled with pytriton has only the Python backend, a small Python model
runs the same file with onnxruntime. Tensors (:class:`~olrec.model.DenseTower`):

    emb:   float32 (B, F, D + 1)
    num:   float32 (B, M)
    logit: float32 (B,)  Triton reports (B, 1): config dims [1], reshaped to the model's []
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .model import DenseTower

OPSET = 17
INPUTS = ("emb", "num")
OUTPUT = "logit"
Precision = Literal["int8", "fp32"]
#: Rows per model run the Triton configs accept (``max_batch_size``) by default.
MAX_BATCH = 1024


@dataclass(frozen=True)
class ModelRepos:
    """The two Triton model repositories one publish writes (each holds the model's directory)."""

    k8s: Path  # onnxruntime backend: a stock Triton
    local: Path  # Python backend running onnxruntime: the Triton bundled with pytriton


def tower_dims(tower: DenseTower) -> tuple[int, int, int]:
    """(F, D + 1, M) of the tower's inputs."""
    m = tower.norm.mean.numel()
    return (tower.deep[0].in_features - m) // tower.dim, tower.dim + 1, m


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session (one thread by default: the serving setting)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_onnx(tower: DenseTower, path: str | Path) -> Path:
    """Write ``tower.forward`` as fp32 ONNX (batch axis dynamic) and check it
    against torch with onnxruntime (1e-5)."""
    path = Path(path)
    f, d1, m = tower_dims(tower)
    model = copy.deepcopy(tower).cpu().eval()  # the live tower keeps learning, maybe on a GPU
    gen = torch.Generator().manual_seed(0)
    emb, num = torch.randn(64, f, d1, generator=gen), torch.randn(64, m, generator=gen)
    with warnings.catch_warnings():
        # The legacy TorchScript exporter: the dynamo one needs onnxscript, and
        # this graph (no control flow) is what the legacy one handles best.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (emb[:2], num[:2]), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_axes={n: {0: "batch"} for n in (*INPUTS, OUTPUT)})
    with torch.no_grad():
        want = model(emb, num).numpy()
    got = session(path).run([OUTPUT], {"emb": emb.numpy(), "num": num.numpy()})[0]
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"ONNX export {path} differs from torch: max |diff| {np.abs(got - want).max():.3g}")
    return path


def quantize_int8(src: str | Path, dst: str | Path, calibration: tuple[np.ndarray, np.ndarray]) -> Path:
    """int8 MLP (and cross network) of an fp32 export: static QDQ with
    per-tensor scales, activation ranges from ``calibration`` = (emb, num),
    recent inputs of the tower.

    Static, not dynamic quantization: Triton batches concurrent requests into
    one run, and dynamic quantization scales activations per run, so a row's
    score would depend on its batch mates. Fixed scales keep each row's score
    its own. On MovieLens-100K (bench/quantize.py) both kept AUC to 1e-4;
    dynamic moved logits by up to 0.7 with wider batch mates, and its file
    was 3-13% smaller and it ran up to 5% faster. The prior and linear reads
    stay fp32: each has one output column (nothing to save), and the prior
    reads the raw numeric inputs, whose ranges (a year beside rate logits of
    +-2) one int8 scale cannot hold: quantized too, the deep logit's AUC fell
    from 0.695 to 0.615.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = Path(src), Path(dst)
    emb, num = (np.ascontiguousarray(x, np.float32) for x in calibration)
    if len(emb) == 0 or len(emb) != len(num):
        raise ValueError(f"calibration needs rows of emb and num alike; got {emb.shape} and {num.shape}")
    gemms = [n.name for n in onnx.load(src).graph.node
             if n.op_type == "Gemm" and not n.name.startswith(("/prior/", "/linear/"))]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({"emb": emb[i : i + 1024], "num": num[i : i + 1024]} for i in range(0, len(emb), 1024))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, nodes_to_quantize=gemms, per_channel=False,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    model = onnx.load(dst)
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    quantized = [n.name for n in model.graph.node if n.op_type == "Gemm" and made_by.get(n.input[1]) == "DequantizeLinear"]
    if sorted(quantized) != sorted(gemms):
        raise RuntimeError(f"quantized {quantized} of the MLP layers {gemms} of {src}")
    # The quantizer annotates every intermediate tensor's shape, which
    # onnxruntime infers anyway: 14% of the default tower's int8 file.
    del model.graph.value_info[:]
    onnx.save(model, dst)
    return dst


def _config(name: str, backend: str, dims: dict[str, list[int]], max_batch_size: int, kind: int) -> str:
    cfg = mc.ModelConfig(
        name=name, backend=backend, max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=n, data_type=mc.TYPE_FP32, dims=dims[n]) for n in INPUTS],
        # The model's output is (B,); Triton needs a dim past the batch: [1], reshaped to [].
        output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[1], reshape=mc.ModelTensorReshape())],
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        dynamic_batching=mc.ModelDynamicBatching(),
        instance_group=[mc.ModelInstanceGroup(kind=kind, count=1)],  # type: ignore[arg-type]
    )
    return text_format.MessageToString(cfg)


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _check_new_version(model_dir: Path, version: int) -> None:
    have = _versions(model_dir) if model_dir.is_dir() else []
    if have and version <= have[-1]:
        raise ValueError(f"version {version} must be above the latest in {model_dir}, {have[-1]}")


def _add_version(model_dir: Path, version: int, config: str, files: dict[str, Path | str]) -> None:
    """Write config.pbtxt, then ``<version>/`` (built aside and renamed in: a
    polling Triton never sees half a version), then drop all but the new
    version and the one before it (requests in flight on it finish)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp_cfg = model_dir / ".config.pbtxt.tmp"
    tmp_cfg.write_text(config)
    os.replace(tmp_cfg, model_dir / "config.pbtxt")
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))  # Triton skips non-numeric dirs
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, tmp / name)
        else:
            (tmp / name).write_text(content)
    tmp.chmod(0o755)
    os.rename(tmp, model_dir / str(version))
    for old in _versions(model_dir)[:-2]:
        shutil.rmtree(model_dir / str(old))


def write_model_repos(onnx_path: str | Path, root: str | Path, *, name: str = "olrec_ranker", version: int,
                      max_batch_size: int = MAX_BATCH, gpu: bool = False) -> ModelRepos:
    """Add ``version`` of one ONNX file to two Triton model repositories under ``root``:
    ``k8s/`` (onnxruntime backend, KIND_GPU with ``gpu``) and ``local/`` (Python backend)."""
    onnx_path, root = Path(onnx_path), Path(root)
    if version < 1:
        raise ValueError(f"version must be >= 1 (Triton's versions are positive), got {version}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    graph = onnx.load(onnx_path, load_external_data=False).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim[1:]] for i in graph.input}
    if sorted(dims) != sorted(INPUTS) or [o.name for o in graph.output] != [OUTPUT]:
        raise ValueError(f"{onnx_path} has inputs {sorted(dims)} and outputs {[o.name for o in graph.output]}; "
                         f"want {list(INPUTS)} -> {OUTPUT!r}")
    repos = ModelRepos(k8s=root / "k8s", local=root / "local")
    for repo in (repos.k8s, repos.local):  # check both before writing either
        _check_new_version(repo / name, version)
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    _add_version(repos.k8s / name, version, _config(name, "onnxruntime", dims, max_batch_size, kind),
                 {"model.onnx": onnx_path})
    _add_version(repos.local / name, version,
                 _config(name, "python", dims, max_batch_size, mc.ModelInstanceGroup.KIND_CPU),
                 {"model.onnx": onnx_path, "model.py": PYTHON_MODEL})
    return repos


def publish(tower: DenseTower, root: str | Path, version: int, precision: Precision = "int8", *,
            calibration: tuple[np.ndarray, np.ndarray] | None = None, name: str = "olrec_ranker",
            max_batch_size: int = MAX_BATCH, gpu: bool = False) -> ModelRepos:
    """Export, quantize (``precision="int8"``, calibrated on ``calibration`` =
    (emb, num): recent inputs, e.g. :meth:`OnlineLearner.ranking_inputs` of the
    last batch) and add ``version`` to both model repositories. The latest fp32
    and int8 files stay in ``root/onnx``."""
    if precision not in ("int8", "fp32"):
        raise ValueError(f"precision must be 'int8' or 'fp32', got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ValueError("precision='int8' needs calibration=(emb, num): recent inputs of the tower")
    work = Path(root) / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    path = export_onnx(tower, work / f"{name}.fp32.onnx")
    if calibration is not None and precision == "int8":
        path = quantize_int8(path, work / f"{name}.int8.onnx", calibration)
    return write_model_repos(path, root, name=name, version=version, max_batch_size=max_batch_size, gpu=gpu)


PYTHON_MODEL = '''\
"""Triton Python-backend model (written by olrec.export): runs the model.onnx beside it with onnxruntime."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        opts = ort.SessionOptions()
        # One thread per instance: Triton scales with instances and batches.
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.name = args["model_name"]

    def execute(self, requests):
        # The dynamic batcher hands over several requests: one onnxruntime run for all.
        try:
            emb = [pb_utils.get_input_tensor_by_name(r, "emb").as_numpy() for r in requests]
            num = [pb_utils.get_input_tensor_by_name(r, "num").as_numpy() for r in requests]
            logit = self.session.run(["logit"], {"emb": np.concatenate(emb), "num": np.concatenate(num)})[0]
        except Exception as e:  # every request gets the error; the model stays up
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {e}")) for _ in requests]
        ends = np.cumsum([len(e) for e in emb])
        return [pb_utils.InferenceResponse([pb_utils.Tensor("logit", part.reshape(-1, 1))])
                for part in np.split(logit, ends[:-1])]
'''
