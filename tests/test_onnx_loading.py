"""Loading ONNX files safely: every malformed or hostile file gives one clear line and
exit status 2 -- never a crash, a hang or a traceback -- and external data never leaves
the model's folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto as T, helper  # noqa: E402

from gradaudit.errors import ConfigError, GradauditError, LoadError  # noqa: E402
from gradaudit.frontends import onnx_load  # noqa: E402
from onnx_models import light_zoo, make_model, save, tensor  # noqa: E402

# they pass on the oldest supported torch too (no torchvision needed)
pytestmark = [pytest.mark.oldest, pytest.mark.usefixtures("one_thread")]


def linear_model(weight=None) -> "onnx.ModelProto":
    """y = relu(x W^T + b) on x of shape (batch, 4), batch left open."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10 if weight is None else weight
    nodes = [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["y"])]
    return make_model(nodes, [("x", T.FLOAT, ["batch", 4])], [("y", T.FLOAT, ["batch", 3])],
                      [tensor("fc.weight", w), tensor("fc.bias", np.zeros(3, np.float32))])


@pytest.fixture
def model_file(tmp_path):
    return save(linear_model(), tmp_path / "model.onnx")


def check_fails(cli, path, *args, match: str) -> str:
    """``gradaudit check path`` exits 2 with one line on stderr containing ``match``."""
    result = cli("check", str(path), *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- the onnx package
def test_missing_extra_names_the_install_command(cli, model_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    line = check_fails(cli, model_file, match="pip install 'gradaudit[onnx]'")
    assert "onnx extra" in line


def test_onnx_without_the_external_data_fixes_is_refused(cli, model_file, monkeypatch):
    monkeypatch.setattr(onnx, "__version__", "1.20.1")
    line = check_fails(cli, model_file, match="older than 1.21.0")
    assert "CVE-2026-27489" in line and "pip install 'gradaudit[onnx]'" in line


def test_installed_onnx_is_recent_enough():
    assert onnx_load.require_onnx() is onnx


# --------------------------------------------------------------------------- malformed files
def test_size_cap(cli, model_file):
    check_fails(cli, model_file, "--max-model-size", "100B", match="over the 100 B limit (--max-model-size)")


def test_size_cap_bounds_folded_constants(cli, tmp_path):
    """A few bytes of ConstantOfShape that would expand to 4 GB."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"], value=helper.make_tensor("v", T.FLOAT, [1], [0.1])),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [("x", T.FLOAT, [2, 1024])], [("y", T.FLOAT, [2, 1048576])],
                       [tensor("shape", np.array([1024, 1048576], np.int64))])
    check_fails(cli, save(model, tmp_path / "big.onnx"), "--max-model-size", "1GB",
                match="would materialise 4.29 GB of constants, over the 1 GB limit")


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_file(cli, tmp_path, cut):
    data = (light_zoo()[-1]).read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: int(len(data) * cut)])
    result = cli("check", str(path))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_random_bytes(cli, tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    check_fails(cli, path, match="not an ONNX model")


def test_empty_file(cli, tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    check_fails(cli, path, match="not an ONNX model")


def test_a_protobuf_that_is_not_a_model(cli, tmp_path):
    path = tmp_path / "tensor.onnx"
    path.write_bytes(tensor("t", np.ones((3, 3), np.float32)).SerializeToString())
    check_fails(cli, path, match="not an ONNX model")


def test_a_directory(cli, tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    check_fails(cli, folder, match="not a regular file")


def test_unsupported_opset(cli, tmp_path):
    model = linear_model()
    model.opset_import[0].version = 99
    check_fails(cli, save(model, tmp_path / "m.onnx"), match="opset 99 is not supported")


def test_no_default_opset(cli, tmp_path):
    model = linear_model()
    model.opset_import[0].domain = "com.example"
    check_fails(cli, save(model, tmp_path / "m.onnx"), match="imports no default-domain")


def test_declared_size_beyond_the_data(cli, tmp_path):
    model = linear_model()
    w = model.graph.initializer[0]
    del w.dims[:]
    w.dims.extend([100000, 100000])  # 10^10 elements declared, 48 bytes held
    check_fails(cli, save(model, tmp_path / "m.onnx"), match="declares [100000, 100000] (10000000000 elements) but holds 48 bytes")


def test_negative_dimension(cli, tmp_path):
    model = linear_model()
    model.graph.initializer[0].dims[0] = -3
    check_fails(cli, save(model, tmp_path / "m.onnx"), match="negative dimension")


def test_cycle(cli, tmp_path):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                              [helper.make_tensor_value_info("b", T.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    check_fails(cli, save(model, tmp_path / "m.onnx"), match="invalid ONNX model")


def test_missing_input(cli, tmp_path):
    nodes = [helper.make_node("Add", ["x", "nowhere"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    line = check_fails(cli, save(model, tmp_path / "m.onnx"), match="invalid ONNX model")
    assert "nowhere" in line


def test_shape_mismatch_names_the_node(cli, tmp_path):
    """Inference that fails (a 4-wide input into a 5-wide weight): one line."""
    model = linear_model(np.ones((3, 5), np.float32))
    check_fails(cli, save(model, tmp_path / "m.onnx"), match="shape inference failed")


def test_input_shape_must_fit_the_declared_one(cli, model_file):
    check_fails(cli, model_file, "--input-shape", "2,5", match="does not fit input 'x'")
    check_fails(cli, model_file, "--input-shape", "2,4,1", match="has rank 3")
    check_fails(cli, model_file, "--input-shape", "2,4", "--input-shape", "2,4", match="takes 1 input(s) (x)")


# --------------------------------------------------------------------------- external data
@pytest.fixture
def external(tmp_path):
    """A folder with a model whose weight lives in ``weights.bin``; returns a function
    writing the model with the weight's external location replaced."""
    folder = tmp_path / "model"
    folder.mkdir()
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    (folder / "weights.bin").write_bytes(weight.tobytes())

    def write(location: str, offset: int = 0, length: int | None = 48) -> Path:
        model = linear_model(weight)
        w = model.graph.initializer[0]
        w.ClearField("raw_data")
        w.data_location = T.EXTERNAL
        del w.external_data[:]
        entries = {"location": location, "offset": str(offset)}
        if length is not None:
            entries["length"] = str(length)
        for k, v in entries.items():
            e = w.external_data.add()
            e.key, e.value = k, v
        return save(model, folder / "model.onnx")

    write.folder = folder
    write.weight = weight
    return write


def test_external_data_inside_the_folder_loads(external):
    import gradaudit

    path = external("weights.bin")
    m = onnx_load.load(str(path))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(m.proto.graph.initializer[0]), external.weight)
    report = gradaudit.audit(str(path), (torch.randn(2, 4),))
    assert [layer.module for layer in report.layers] == ["fc"]


def test_external_data_in_a_subfolder_loads(external):
    sub = external.folder / "data"
    sub.mkdir()
    (sub / "w.bin").write_bytes(external.weight.tobytes())
    assert onnx_load.load(str(external("data/w.bin"))).proto.graph.initializer[0].raw_data


@pytest.mark.parametrize("location, match", [
    ("/etc/passwd", "absolute path"),
    ("../outside.bin", "leaves the model's folder"),
    ("data/../../outside.bin", "leaves the model's folder"),
    ("missing.bin", "does not exist"),
])
def test_external_data_location_refused(cli, external, location, match):
    (external.folder.parent / "outside.bin").write_bytes(external.weight.tobytes())
    check_fails(cli, external(location), match=match)


@pytest.mark.parametrize("link, match", [(os.symlink, "goes through a symlink"), (os.link, "has 2 hard links")])
def test_external_data_links_refused(cli, external, link, match):
    """A link to a file outside the folder, symbolic or hard."""
    outside = external.folder.parent / "secret.bin"
    outside.write_bytes(external.weight.tobytes())
    link(outside, external.folder / "link.bin")
    check_fails(cli, external("link.bin"), match=match)


def test_external_data_symlinked_folder_refused(cli, external):
    """A symlink in a parent component (CVE-2026-27489), not only the last one."""
    elsewhere = external.folder.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(external.weight.tobytes())
    os.symlink(elsewhere, external.folder / "sub")
    check_fails(cli, external("sub/w.bin"), match="goes through a symlink (sub)")


def test_external_data_range_beyond_the_file(cli, external):
    check_fails(cli, external("weights.bin", offset=16, length=48), match="lies beyond the end")


def test_external_data_in_memory_model_refused(external):
    model = onnx.load(str(external("weights.bin")), load_external_data=False)
    with pytest.raises(LoadError, match="keeps its data in a file"):
        onnx_load.from_proto(model)


# --------------------------------------------------------------------------- sizes and inputs
@pytest.mark.parametrize("text, value", [("500MB", 500_000_000), ("4GiB", 4 << 30), ("1024", 1024), ("2.5kb", 2500)])
def test_parse_size(text, value):
    assert onnx_load.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "4 parsecs", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        onnx_load.parse_size(text)


def test_open_dimensions_get_small_sizes(model_file):
    m = onnx_load.load(str(model_file))
    (x,), source, _ = onnx_load.example_inputs(m)
    assert tuple(x.shape) == (onnx_load.BATCH, 4) and x.dtype == torch.float32
    assert "batch=2" in source


def test_token_ids_drawn_below_the_vocabulary(tmp_path):
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["y"])]
    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    model = make_model(nodes, [("ids", T.INT64, ["batch", "seq"])], [("y", T.FLOAT, ["batch", "seq", 8])],
                       [tensor("emb.weight", table)])
    m = onnx_load.load(str(save(model, tmp_path / "m.onnx")))
    (ids,), _, _ = onnx_load.example_inputs(m)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (2, 8) and 0 <= int(ids.min()) and int(ids.max()) < 50


# --------------------------------------------------------------------------- fuzzing
def _sources():
    return [light_zoo()[-2].read_bytes(), linear_model().SerializeToString()]  # squeezenet, and a Gemm


def test_mutated_models_fail_cleanly():
    """Random byte flips, insertions, deletions and truncations of real models: loading
    and capturing either works or raises a GradauditError (one line, exit 2)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    from gradaudit.frontends import onnx as frontend

    sources = _sources()

    @st.composite
    def mutated(draw):
        data = bytearray(sources[draw(st.integers(0, len(sources) - 1))])
        for _ in range(draw(st.integers(1, 8))):
            kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            if kind == "flip" and data:
                data[at] = draw(st.integers(0, 255))
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete":
                del data[at: at + draw(st.integers(1, 8))]
            else:
                del data[at:]
        return bytes(data)

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.onnx"

        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(mutated())
        def run(data):
            path.write_bytes(data)
            try:
                m = onnx_load.load(str(path), max_bytes=1 << 28)
                inputs, _, _ = onnx_load.example_inputs(m)
                frontend.capture(m, inputs)
            except GradauditError as exc:
                assert str(exc) and "\n" not in str(exc).strip()

        run()
    assert hypothesis


def test_structurally_mutated_models_fail_cleanly(tmp_path):
    """Field-level mutations of real models (dims, types, op types, inputs, attributes,
    opsets, deleted or repeated nodes) through the whole static audit: a report or a
    GradauditError, nothing else."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    import gradaudit
    from onnx_models import export
    from probe_models import small_models

    model, (x,) = small_models()["conv_bn_dropout"]
    sources = [linear_model(), onnx.load(str(export(model, (x,), tmp_path / "cbd.onnx")))]
    ops = ["Conv", "Gemm", "MatMul", "Reshape", "Concat", "Softmax", "BatchNormalization", "Gather", "Slice", "Pad",
           "LSTM", "Relu", "Add", "Transpose", "MaxPool", "Dropout", "ConstantOfShape", "Expand", "Foo"]

    @st.composite
    def mutated(draw):
        m = onnx.ModelProto()
        m.CopyFrom(sources[draw(st.integers(0, len(sources) - 1))])
        g = m.graph
        names = [t for n in g.node for t in list(n.input) + list(n.output)] + ["", "ghost"]
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.integers(0, 7))
            if kind == 0 and g.initializer:
                t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
                if t.dims:
                    t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.sampled_from([0, 1, 2, 7, -1, 10**6]))
            elif kind == 1 and g.initializer:
                g.initializer[draw(st.integers(0, len(g.initializer) - 1))].data_type = draw(st.integers(0, 30))
            elif kind == 2 and g.node:
                g.node[draw(st.integers(0, len(g.node) - 1))].op_type = draw(st.sampled_from(ops))
            elif kind == 3 and g.node:
                n = g.node[draw(st.integers(0, len(g.node) - 1))]
                if n.input:
                    n.input[draw(st.integers(0, len(n.input) - 1))] = draw(st.sampled_from(names))
            elif kind == 4 and g.node:
                for a in g.node[draw(st.integers(0, len(g.node) - 1))].attribute:
                    if a.type == onnx.AttributeProto.INT:
                        a.i = draw(st.sampled_from([-1, 0, 1, 2, 99]))
                    elif a.type == onnx.AttributeProto.INTS and len(a.ints):
                        a.ints[0] = draw(st.sampled_from([-1, 0, 5, 1000]))
            elif kind == 5 and g.node:
                del g.node[draw(st.integers(0, len(g.node) - 1))]
            elif kind == 6:
                m.opset_import[0].version = draw(st.integers(1, 30))
            elif kind == 7 and g.input:
                info = g.input[0].type.tensor_type
                if info.shape.dim:
                    info.shape.dim[0].dim_value = draw(st.sampled_from([0, 1, 3]))
        return m.SerializeToString()

    path = tmp_path / "fuzz.onnx"

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated())
    def run(data):
        path.write_bytes(data)
        try:
            gradaudit.audit(onnx_load.load(str(path), max_bytes=1 << 28))
        except GradauditError as exc:
            assert str(exc) and "\n" not in str(exc).strip()

    run()
