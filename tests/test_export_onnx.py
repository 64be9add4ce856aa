"""ONNX export: parity with PyTorch on onnxruntime CPU (fp32, fp16) for every graph, at two
batch sizes × two latent sizes (one non-square) — the dynamic axes — plus metadata, external
data, bf16 handling, the kernel switch and the mismatch error. Micro models (tests/export_helpers.py);
each graph is exported once per session."""

import copy

import numpy as np
import onnx
import pytest
import torch

from export_helpers import ROOT, parity_export, parity_model
from ldm_fast import ops
from ldm_fast.export import onnx_export as E
from ldm_fast.export.validate import TOLERANCES, NotValidated, ValidationError, session, validate_graph

SIZES = [(4, 4), (6, 4)]  # latent (h, w); the micro UNet needs multiples of 2


def _check(path, name, precision, model=None, cond=None):
    checks = validate_graph(path, model or parity_model(), cond, name, precision, batches=(1, 3), sizes=SIZES)
    assert {c.batch for c in checks} == {1, 3}
    assert all(c.passed for c in checks)
    if name != "cond_encoder":
        assert {c.size for c in checks} == set(SIZES)
    return checks


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graph", ["unet", "decoder", "encoder"])
def test_graph_matches_pytorch_on_onnxruntime(graph, precision):
    checks = _check(parity_export(graph, precision), graph, precision)
    if precision == "fp16":
        # The check is against the fp32 model: fp16 error is real but within the documented bar.
        assert max(c.max_error for c in checks) > 0
        assert all(c.same_precision_error is not None for c in checks)


def test_unet_graph_inputs_dynamic_axes_and_metadata():
    model = parity_model()
    proto = onnx.load(str(parity_export("unet", "fp32")))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert dims == {"latent": ["batch", 3, "height", "width"], "timestep": ["batch"],
                    "context": ["batch", "tokens", 12], "class_labels": ["batch"],
                    "concat": ["batch", 2, "height", "width"]}
    out = proto.graph.output[0]
    assert out.name == "prediction"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == E.DEFAULT_OPSET
    assert "GroupNormalization" in {n.op_type for n in proto.graph.node}  # native at opset 21

    meta = E.read_metadata(parity_export("unet", "fp32"))
    assert meta["graph"] == "unet" and meta["precision"] == "fp32" and meta["parameterization"] == "eps"
    assert meta["scale_factor"] == float(model.scale_factor)
    # The float64 schedule survives the trip bit for bit.
    assert meta["alphas_cumprod"] == model.schedule.alphas_cumprod.tolist()
    assert meta["config"]["unet"]["context_dim"] == 12 and meta["version"]
    assert meta["spec"]["info"]["spatial_multiple"] == 2


def test_fp16_graph_is_fp16_with_fp32_islands():
    proto = onnx.load(str(parity_export("unet", "fp16")))
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.input}
    assert types["latent"] == onnx.TensorProto.FLOAT16 and types["context"] == onnx.TensorProto.FLOAT16
    assert types["timestep"] == onnx.TensorProto.FLOAT and types["class_labels"] == onnx.TensorProto.INT64
    gn = [n for n in proto.graph.node if n.op_type == "GroupNormalization"]
    assert gn and "Cast" in {n.op_type for n in proto.graph.node}


def test_vq_decoder_folds_scale_and_codebook():
    """The decoder graph takes the sampler's scaled latent: the VQ codebook lookup and the
    1/scale_factor are inside (ArgMin over code distances, no separate quantiser step)."""
    model = parity_model()
    ops_in = {n.op_type for n in onnx.load(str(parity_export("decoder", "fp32"))).graph.node}
    assert "ArgMin" in ops_in
    z = torch.randn(2, 3, 4, 6)
    sess = session(parity_export("decoder", "fp32"))
    got = sess.run(None, {"latent": z.numpy()})[0]
    with E.reference_ops(), torch.no_grad():
        want = model.decode(z)  # LatentDiffusion.decode: z / scale → quantise → decoder
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- conditioning encoder

@pytest.fixture(scope="module")
def layout_encoder():
    cond = pytest.importorskip("ldm_fast.conditioning", reason="conditioning encoders not available")
    torch.manual_seed(3)
    return cond.LayoutEncoder(num_classes=4, max_length=9, embed_dim=12, n_layers=1, n_heads=2).eval()


@pytest.fixture(scope="module")
def layout_exports(layout_encoder):
    out = {}
    for precision in ("fp32", "fp16"):
        path = ROOT / "layout" / f"cond_encoder_{precision}.onnx"
        E.export_one("cond_encoder", parity_model(), path, layout_encoder, precision)
        out[precision] = path
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cond_encoder_matches_pytorch(layout_exports, layout_encoder, precision):
    _check(layout_exports[precision], "cond_encoder", precision, cond=layout_encoder)
    spec = E.read_metadata(layout_exports[precision])["spec"]
    assert spec["inputs"][0]["name"] == "tokens" and spec["outputs"][0]["name"] == "context"
    assert spec["info"]["kind"] == "layout"


def test_class_embedder_graph_spec():
    cond = pytest.importorskip("ldm_fast.conditioning", reason="conditioning encoders not available")
    graph, spec = E.cond_encoder_graph(cond.ClassEmbedder(7, 12), parity_model().cfg)
    assert spec.info == {"kind": "class", "num_classes": 7, "null_id": 7}
    assert graph(torch.tensor([0, 7])).shape == (2, 1, 12)  # the null id is a valid input


def test_mismatch_names_output_and_error(layout_exports, layout_encoder):
    other = copy.deepcopy(layout_encoder)
    with torch.no_grad():
        other.transformer.norm.bias.add_(0.5)  # a different model than the one exported
    with pytest.raises(ValidationError, match=r"output 'context': max error .* exceeds the allowed"):
        validate_graph(layout_exports["fp32"], parity_model(), other, "cond_encoder", "fp32")


def test_external_data_above_threshold(layout_encoder, layout_exports):
    path = ROOT / "external" / "cond_encoder.onnx"
    E.export_one("cond_encoder", parity_model(), path, layout_encoder, "fp32", external_data_threshold=0)
    data = path.with_name(path.name + ".data")
    assert data.is_file() and data.stat().st_size > 0
    tokens = np.random.default_rng(0).integers(0, 21, (2, 9))
    got = session(path).run(None, {"tokens": tokens})[0]
    want = session(layout_exports["fp32"]).run(None, {"tokens": tokens})[0]
    np.testing.assert_array_equal(got, want)
    # The hash covers the weights too.
    before = E.file_sha256(path)
    data.write_bytes(data.read_bytes()[:-1] + b"\x00")
    assert E.file_sha256(path) != before


def test_bf16_is_exported_but_not_validated_on_cpu(layout_encoder):
    path = ROOT / "bf16" / "cond_encoder.onnx"
    E.export_one("cond_encoder", parity_model(), path, layout_encoder, "bf16")  # passes onnx.checker
    proto = onnx.load(str(path))
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert "bf16" not in TOLERANCES
    with pytest.raises(NotValidated, match="onnxruntime's CPU provider"):
        validate_graph(path, parity_model(), layout_encoder, "cond_encoder", "bf16")


def test_kernel_switch_does_not_change_the_export():
    """With the Triton kernels switched on (the interpreter runs them on CPU), export still
    traces the PyTorch reference ops — GroupNorm(+SiLU) and attention, the two ops with
    kernels — and the caller's switch is restored afterwards. Every graph goes through
    export_graph; a GroupNorm + attention block is enough to show it, and cheap to export."""
    from ldm_fast.autoencoder import AttnBlock, ResnetBlock

    class Block(torch.nn.Module):  # export_graph feeds inputs by the spec's names
        def __init__(self):
            super().__init__()
            self.res, self.attn = ResnetBlock(16, 16, 8), AttnBlock(16, 8)

        def forward(self, latent):
            return self.attn(self.res(latent))

    torch.manual_seed(5)
    block = Block().eval()
    spec = E.GraphSpec("block", [E.TensorSpec("latent", "float32", ["batch", 16, "height", "width"])],
                       [E.TensorSpec("out", "float32", ["batch", 16, "height", "width"])])
    sizes = {"batch": 2, "height": 4, "width": 6}
    paths = {}
    for backend in ("eager", "triton"):
        with ops.backend(backend):
            paths[backend] = E.export_graph(block, spec, ROOT / "switch" / f"{backend}.onnx", sizes, {})
            assert ops.get_backend() == backend
    a, b = (onnx.load(str(paths[k])) for k in ("eager", "triton"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert "GroupNormalization" in {n.op_type for n in b.graph.node}
    assert not any(n.domain not in ("", "ai.onnx") for n in b.graph.node)  # no custom ops
    z = np.random.default_rng(1).standard_normal((1, 16, 4, 4)).astype(np.float32)
    got = session(paths["triton"]).run(None, {"latent": z})[0]
    np.testing.assert_array_equal(got, session(paths["eager"]).run(None, {"latent": z})[0])
    with E.reference_ops(), torch.no_grad():
        np.testing.assert_allclose(got, block(torch.from_numpy(z)).numpy(), atol=1e-5)


def test_bad_options_are_refused():
    with pytest.raises(E.ExportError, match="precision"):
        E.export_one("unet", parity_model(), ROOT / "x.onnx", precision="fp8")
    with pytest.raises(E.ExportError, match="opset"):
        E.export_graph(torch.nn.Identity(), E.unet_spec(parity_model().cfg), ROOT / "x.onnx", {}, {}, opset=13)
    with pytest.raises(E.ExportError, match="no conditioning encoder"):
        E.build_graph("cond_encoder", parity_model(), None)
