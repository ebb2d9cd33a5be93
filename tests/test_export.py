"""The dense tower as ONNX (fp32, int8) and the two Triton model repositories written from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from olrec.export import export_onnx, publish, quantize_int8, session, write_model_repos  # noqa: E402
from olrec.features import encode, ml100k_spec  # noqa: E402
from olrec.learner import LearnerConfig, OnlineLearner  # noqa: E402
from olrec.metrics import auc  # noqa: E402
from olrec.model import DenseTower  # noqa: E402
from olrec.sources import read_ml100k  # noqa: E402

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
F, D, M = 7, 4, 13


def _tower(arch: str = "deepfm", seed: int = 0) -> DenseTower:
    torch.manual_seed(seed)
    t = DenseTower(F, D, M, arch=arch, hidden=(16, 8), prior=torch.randn(M))  # type: ignore[arg-type]
    with torch.no_grad():  # non-trivial numeric statistics and cross layers (zero at init)
        t.norm.update(torch.randn(500, M) * 3 + 1)
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return t


def _inputs(b: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, F, D + 1)).astype(np.float32), rng.normal(size=(b, M)).astype(np.float32)


@pytest.mark.parametrize("arch", ["deepfm", "dcn"])
def test_onnx_matches_torch_at_any_batch_size(tmp_path: Path, arch: str) -> None:
    tower = _tower(arch)
    path = export_onnx(tower, tmp_path / "t.onnx")
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["emb", "num"] and [o.name for o in sess.get_outputs()] == ["logit"]
    for b in (1, 3, 257):
        emb, num = _inputs(b)
        got = sess.run(["logit"], {"emb": emb, "num": num})[0]
        with torch.no_grad():
            want = tower.eval()(torch.from_numpy(emb), torch.from_numpy(num)).numpy()
        assert got.shape == (b,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_export_is_deterministic(tmp_path: Path) -> None:
    tower = _tower()
    assert export_onnx(tower, tmp_path / "a.onnx").read_bytes() == export_onnx(tower, tmp_path / "b.onnx").read_bytes()


def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _check_io(cfg: mc.ModelConfig) -> None:
    assert cfg.name == "olrec_ranker" and cfg.max_batch_size == 1024
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("emb", mc.TYPE_FP32, [F, D + 1]), ("num", mc.TYPE_FP32, [M])]
    [out] = cfg.output
    assert (out.name, out.data_type, list(out.dims)) == ("logit", mc.TYPE_FP32, [1])
    assert out.HasField("reshape") and list(out.reshape.shape) == []  # the model's (B,)
    assert cfg.HasField("dynamic_batching")
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest" and cfg.version_policy.latest.num_versions == 1


@pytest.mark.parametrize("gpu", [False, True])
def test_model_repos_configs_parse(tmp_path: Path, gpu: bool) -> None:
    repos = publish(_tower(), tmp_path, version=7, precision="fp32", gpu=gpu)
    k8s, local = _config(repos.k8s / "olrec_ranker" / "config.pbtxt"), _config(repos.local / "olrec_ranker" / "config.pbtxt")
    _check_io(k8s)
    _check_io(local)
    assert k8s.backend == "onnxruntime" and local.backend == "python"
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    assert [g.kind for g in k8s.instance_group] == [kind]
    assert [g.kind for g in local.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert sorted(p.name for p in (repos.k8s / "olrec_ranker" / "7").iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in (repos.local / "olrec_ranker" / "7").iterdir()) == ["model.onnx", "model.py"]
    onnx_bytes = (repos.k8s / "olrec_ranker" / "7" / "model.onnx").read_bytes()
    assert onnx_bytes == (repos.local / "olrec_ranker" / "7" / "model.onnx").read_bytes()
    assert onnx_bytes == (tmp_path / "onnx" / "olrec_ranker.fp32.onnx").read_bytes()


def test_versions_keep_current_and_previous(tmp_path: Path) -> None:
    tower = _tower()
    path = export_onnx(tower, tmp_path / "t.onnx")
    for v in (1, 2, 5):
        repos = write_model_repos(path, tmp_path / "repo", version=v)
    for repo in (repos.k8s, repos.local):
        assert sorted(p.name for p in (repo / "olrec_ranker").iterdir()) == ["2", "5", "config.pbtxt"]  # no temp left
    with pytest.raises(ValueError, match="version 5 must be above the latest"):
        write_model_repos(path, tmp_path / "repo", version=5)
    with pytest.raises(ValueError, match="version 4 must be above"):
        write_model_repos(path, tmp_path / "repo", version=4)
    assert sorted(p.name for p in (repos.local / "olrec_ranker").iterdir()) == ["2", "5", "config.pbtxt"]


def test_publish_rejects_unknown_precision_and_uncalibrated_int8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'fp16'"):
        publish(_tower(), tmp_path, 1, precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration"):
        publish(_tower(), tmp_path, 1, precision="int8")


def test_int8_rows_do_not_depend_on_their_batch(tmp_path: Path) -> None:
    """Triton batches requests together: a row's int8 score must be the same alone or batched."""
    int8 = quantize_int8(export_onnx(_tower(), tmp_path / "f.onnx"), tmp_path / "q.onnx", _inputs(512, seed=2))
    emb, num = _inputs(300)
    emb[100:] *= 5  # batch mates with a far wider range
    sess = session(int8)
    batched = sess.run(["logit"], {"emb": emb, "num": num})[0]
    alone = sess.run(["logit"], {"emb": emb[:100], "num": num[:100]})[0]
    np.testing.assert_array_equal(alone, batched[:100])


#: The default tower, and one whose weights outweigh the ONNX graph (the width of DLRM's top MLP for Criteo).
WIDE_TOWER = (512, 256)


@pytest.fixture(scope="module", params=["default", "wide"])
def trained(request, tmp_path_factory):
    """Train on the first 80% of MovieLens-100K; export the tower as fp32 and int8."""
    if not ML100K.is_dir():
        pytest.skip("MovieLens-100K not in ../shared/data")
    tmp = tmp_path_factory.mktemp("int8")
    events, spec = read_ml100k(ML100K), ml100k_spec()
    cfg = LearnerConfig() if request.param == "default" else LearnerConfig(hidden=WIDE_TOWER)
    learner = OnlineLearner(spec, cfg)
    split = int(events.num_rows * 0.8)
    learner.learn(encode(events.slice(0, split), spec))
    fp32 = export_onnx(learner.model, tmp / "fp32.onnx")
    int8 = quantize_int8(fp32, tmp / "int8.onnx", learner.calibration())
    return learner, encode(events.slice(split), spec), fp32, int8


def test_int8_keeps_auc(trained) -> None:
    """The last 20% scored by the whole model (counters, wide part, blend) whose
    deep logit comes from the fp32 or the int8 ONNX file."""
    learner, test, fp32, int8 = trained
    emb, num, p_wide = learner.ranking_inputs(test)
    aucs = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        logit = session(path).run(["logit"], {"emb": emb.numpy(), "num": num.numpy()})[0]
        aucs[name] = auc(test.label, learner.blend_probs(torch.from_numpy(logit), p_wide))
    assert aucs["fp32"] > 0.65, aucs  # a trained model: the comparison means something
    assert abs(aucs["int8"] - aucs["fp32"]) <= 0.002, aucs


def test_int8_file_is_at_most_0_3x_of_fp32(request, trained) -> None:
    learner, _, fp32, int8 = trained
    if learner.cfg.hidden != WIDE_TOWER:
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="known miss (issue 4): the default tower (hidden=(32,)) holds ~1.4k weights; its "
                                "graph outweighs them, so int8 is 0.91x of fp32; the (512, 256) tower is 0.27x"))
    assert int8.stat().st_size <= 0.3 * fp32.stat().st_size, (int8.stat().st_size, fp32.stat().st_size)
