"""A method is one file plus one registry line: a toy method defined in a temporary module joins through the
public registry and is trained, exported to ONNX and compared with no other file touched; and no code outside
fedmedclip/methods/ names a method."""

from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH

from fedmedclip.methods import METHODS, method_groups, register_method, unregister_method

REPO = Path(__file__).resolve().parents[1]

TOY = textwrap.dedent(
    '''
    """Toy: a softmax attention Linear(D, D) trained with the contrastive loss (a test's own method)."""
    import torch
    from torch import nn

    from fedmedclip.losses import contrastive_loss
    from fedmedclip.methods.base import Method, SiteTrainer, batch_stream, generator
    from fedmedclip.modules import adapt
    from fedmedclip.seeding import seeded


    class ToyAttention(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc = nn.Linear(dim, dim)

        def forward(self, f):
            return torch.softmax(self.fc(f), dim=1)


    class ToySite(SiteTrainer):
        def __init__(self, method, data, index):
            super().__init__(method, data, index)
            self.attention = method.new_global()

        def shared_module(self):
            return self.attention

        def train_round(self, round_index):
            ctx, opt = self.m.ctx, self.m.opt
            sgd = torch.optim.SGD(self.attention.parameters(), lr=opt["lr"])
            stream = batch_stream(len(self.data.train_y), ctx.batch_size, generator(ctx.seed, self.index, round_index))
            total = 0.0
            for _ in range(opt["steps"]):
                idx = next(stream)
                loss = contrastive_loss(adapt(self.attention, self.data.train_x[idx]), ctx.text_features, self.data.train_y[idx])
                sgd.zero_grad()
                loss.backward()
                sgd.step()
                total += loss.item()
            return {"loss": total / opt["steps"], "steps": opt["steps"]}

        def resumable_parts(self):
            return {"attention": self.attention}


    class Toy(Method):
        name = "toy"
        weighting = "samples"
        default_preprocessing = "clip"
        group = "cached"
        compare_references = ("local",)
        exportable = True
        site_class = ToySite
        options = {"lr": 0.5, "steps": 3}
        option_help = {"lr": "SGD learning rate", "steps": "steps per round"}

        def new_global(self):
            with seeded(self.seed_for("global")):
                return ToyAttention(self.ctx.feature_dim)
    '''
)


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy_method.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_method", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_method"] = module
    spec.loader.exec_module(module)
    register_method(module.Toy)
    try:
        yield module.Toy
    finally:
        unregister_method("toy")
        sys.modules.pop("toy_method", None)


def test_a_toy_method_trains_exports_and_compares_through_the_registry(
    toy, tmp_path, capsys, synthetic_cache
):
    import onnxruntime as ort

    from fedmedclip import compare
    from fedmedclip.cli import main
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train
    from fedmedclip.export import export_onnx

    assert "toy" in method_groups()["cached"] and "toy@local" in method_groups()["cached"]
    assert main(["methods"]) == 0 and "--method-opt steps=3" in capsys.readouterr().out

    cfg = TrainConfig(
        method="toy", rounds=2, synthetic=SYNTH, cache_dir=str(synthetic_cache), out=str(tmp_path / "run")
    )
    results = train(cfg, progress=False)
    assert results["method"] == "toy" and len(results["history"]) == 2
    from safetensors.torch import load_file

    from fedmedclip.methods import MethodContext

    trained = load_file(str(tmp_path / "run" / "model" / "global.safetensors"))
    initial = toy(MethodContext(128, 4, trained["fc.weight"][:4])).new_global().state_dict()
    assert not np.allclose(trained["fc.weight"].numpy(), initial["fc.weight"].numpy())  # it learned something

    # The TorchScript exporter: what is checked is that a registered method exports, not the exporter (0.15 s
    # against about 3 s of CPU for dynamo, whose parity tests/test_export.py checks).
    onnx_path = export_onnx(tmp_path / "run", "global", tmp_path / "toy.onnx", exporter="torchscript")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[1]
    probs = session.run(["probabilities"], {"images": np.zeros((2, size, size, 3), np.uint8)})[0]
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)

    base = TrainConfig(rounds=1, synthetic=SYNTH, cache_dir=str(synthetic_cache))
    cells = compare.build_cells(compare.parse_methods("toy,toy@local"), compare.parse_partitions("iid"), [0])
    records = compare.run_grid(base, cells, tmp_path / "grid", {"toy.steps": 2}, progress=False)
    assert [r["method"] for r in records] == ["toy", "toy@local"]
    assert records[0]["results"]["method_options"] == {"lr": 0.5, "steps": 2}


# Where the product's name is a literal for other reasons (experiment, model, logger, bucket names), only
# its use as a method counts: a comparison, a dict key, a subscript, or the default of a `method` setting.
PRODUCT = "fedmedclip"


def _method_literals(path: Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    as_method: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for c in [node.left, *node.comparators]:
                as_method.update(id(e) for e in ast.walk(c) if isinstance(e, ast.Constant))
        elif isinstance(node, ast.Dict):
            as_method.update(id(k) for k in node.keys if isinstance(k, ast.Constant))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            as_method.add(id(node.slice))
        elif (
            isinstance(node, ast.AnnAssign)
            and getattr(node.target, "id", "") == "method"
            and node.value is not None
        ):
            as_method.add(id(node.value))
        elif isinstance(node, ast.Call) and any(
            isinstance(a, ast.Constant) and a.value in ("--method", "method") for a in node.args
        ):
            as_method.update(id(k.value) for k in node.keywords if k.arg == "default")
        elif isinstance(node, ast.arguments):
            args = node.posonlyargs + node.args
            for a, d in zip(args[len(args) - len(node.defaults) :], node.defaults, strict=True):
                if a.arg == "method":
                    as_method.add(id(d))
            for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True):
                if a.arg == "method" and d is not None:
                    as_method.add(id(d))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            if node.value == PRODUCT and id(node) not in as_method:
                continue
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    return found


def test_no_method_is_named_outside_its_module_and_the_registry():
    names = set(METHODS)
    files = [
        p
        for top in ("fedmedclip", "components", "pipelines", "serving")
        for p in sorted((REPO / top).rglob("*.py"))
        if "methods" not in p.relative_to(REPO / top).parts[:1] or top != "fedmedclip"
    ]
    assert len(files) > 30
    found = [hit for p in files for hit in _method_literals(p, names)]
    assert found == [], (
        "method names written outside fedmedclip/methods/ (declare it on the method instead):\n"
        + "\n".join(found)
    )


def test_methods_lists_each_method_with_a_whole_sentence():
    from fedmedclip.methods import describe_methods

    summaries = {
        line.split(": ", 1)[0]: line.split(": ", 1)[1]
        for line in describe_methods().splitlines()
        if not line.startswith(" ")
    }
    assert set(summaries) == set(METHODS)
    # A docstring's first line stops mid-sentence ("... a class-wise"); the listing gives the sentence.
    assert all(s.endswith(".") for s in summaries.values()), summaries
    assert summaries["fedmedclip"].endswith("local prediction is an uncertainty-weighted ensemble.")
