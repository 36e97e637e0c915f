"""Personalised serving and the out-of-distribution watch (issue 17): a FedMedCLIP site exports its own
ensemble from its private state after a real mailbox run (server and sites as in a deployment, here threads
over a local-directory mailbox), the global model is exported from the server's run directory, and one
server serves both under their names; its answers carry the OOD score and flag, and /metrics the windowed
flagged rate and the drift test between recent requests and the exported reference."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import SYNTH
from serving_fixtures import metric_samples, running_server, uint8_json

ort = pytest.importorskip("onnxruntime")

RUN = "r17"
SITES = ("site_0", "site_1")
RATE = 0.2  # what a synthetic site's 8 held-out images can calibrate (5 % needs 19)


def train_args(cache: Path) -> list[str]:
    return [
        "--method", "fedmedclip", "--rounds", "2", "--sites", str(len(SITES)), "--cache-dir", str(cache),
        "--seed", "0", "--synthetic", json.dumps(SYNTH),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mailbox_run(tmp_path_factory, synthetic_cache):
    """A finished mailbox run: (its directory, the server's run directory, each site's state)."""
    from fedmedclip.cli import main

    tmp = tmp_path_factory.mktemp("mailbox-run")
    mailbox, out = str(tmp / "mailbox"), tmp / "server"
    server = ["-q", "server", "run", "--mailbox", mailbox, "--run-id", RUN, "--out", str(out)]
    states = {s: tmp / "state" / s for s in SITES}
    with ThreadPoolExecutor(len(SITES) + 1) as pool:
        parties = [pool.submit(main, [*server, *train_args(synthetic_cache)])] + [
            pool.submit(
                main,
                [
                    "-q",
                    "site",
                    "run",
                    "--mailbox",
                    mailbox,
                    "--run-id",
                    RUN,
                    "--site",
                    s,
                    "--state",
                    str(states[s]),
                    "--cache-dir",
                    str(synthetic_cache),
                ],
            )  # fmt: skip
            for s in SITES
        ]
        assert [p.result(timeout=300) for p in parties] == [0] * (len(SITES) + 1)
    return tmp, mailbox, out, states


@pytest.fixture(scope="module")
def exported(mailbox_run, synthetic_cache):
    """site_0's personalised model from its own state, and the global model from the server's directory."""
    from fedmedclip.cli import main

    tmp, _, out, _ = mailbox_run
    site_onnx, global_onnx = tmp / "site_0.onnx", tmp / "global.onnx"
    assert main([*site_0_export(mailbox_run, synthetic_cache), "--out", str(site_onnx)]) == 0
    assert main(["export", str(out), "--site", "global", "--out", str(global_onnx), *EXPORT_OPTIONS]) == 0
    return site_onnx, global_onnx


EXPORT_OPTIONS = ["--ood-false-alarm-rate", str(RATE), "--exporter", "torchscript"]


def site_0_export(mailbox_run, cache) -> list[str]:
    """`fedmedclip export`'s arguments for site_0's model from its own state, but --out."""
    _, mailbox, _, states = mailbox_run
    site = ["--state", str(states["site_0"]), "--site", "site_0", "--mailbox", mailbox, "--run-id", RUN]
    return ["export", *site, "--cache-dir", str(cache), *EXPORT_OPTIONS]


@pytest.mark.slow  # a mailbox run of three parties (about 10 s here)
def test_a_site_exports_its_own_model_from_its_private_state(
    mailbox_run, exported, tmp_path, synthetic_cache
):
    """The MLP never left the site: the server's run directory holds no site model, and the mailbox no
    private key. Yet the model exported from the site's state is exactly the personalised model the
    in-process simulator exports for the same seed and run id."""
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train
    from fedmedclip.export import export_onnx

    tmp, mailbox, out, states = mailbox_run
    site_onnx, _ = exported
    assert not list((out / "model").glob("site_*")), "the server holds a site's private model"
    assert not [p for p in Path(mailbox).rglob("*") if "site_0.safetensors" in p.name]
    assert (states["site_0"] / "model" / "site_site_0.safetensors").is_file()

    cfg = TrainConfig(
        data="synthetic", synthetic=SYNTH, rounds=2, sites=len(SITES), cache_dir=str(synthetic_cache),
        out=str(tmp_path / "train"),
    )  # fmt: skip
    train(cfg, progress=False, run_id=RUN)
    reference = export_onnx(
        cfg.out, "site_0", tmp_path / "ref.onnx", false_alarm_rate=RATE, exporter="torchscript"
    )
    size = int(ort.InferenceSession(str(site_onnx)).get_inputs()[0].shape[1])
    images = np.random.default_rng(0).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    got = ort.InferenceSession(str(site_onnx)).run(None, {"images": images})
    want = ort.InferenceSession(str(reference)).run(None, {"images": images})
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    meta = ort.InferenceSession(str(site_onnx)).get_modelmeta().custom_metadata_map
    assert meta["fedmedclip.site"] == "site_0" and meta["fedmedclip.run_id"] == RUN
    # The site's export names the run's model as the server's run directory holds it (what registration
    # recomputes from the logged run), and so does the global export from that directory.
    from fedmedclip.digests import model_dir_digest

    digest = model_dir_digest(out / "model")
    assert meta["fedmedclip.model_digest"] == digest
    global_meta = ort.InferenceSession(str(exported[1])).get_modelmeta().custom_metadata_map
    assert global_meta["fedmedclip.model_digest"] == digest
    assert json.loads(meta["fedmedclip.ood.calibration"])["holder"] == "site_0"


@pytest.mark.slow  # the same mailbox run; the export itself takes seconds
def test_a_site_exports_with_its_weights_moved_and_is_refused_other_weights(
    mailbox_run, exported, tmp_path, synthetic_cache, capsys
):
    """`export --state --backbone DIR` loads the frozen weights from where they are now, as a run directory's
    export does: it was silently ignored (the run's spec loaded instead). Other weights are refused in one line,
    naming the hash; the same weights moved give the same model."""
    from conftest import error_lines

    from fedmedclip.backbone import random_clip
    from fedmedclip.cli import main

    for seed in (0, 1):  # seed 0: the built-in `tiny` of the run, saved elsewhere; seed 1: other weights
        model, tokenizer = random_clip("tiny", seed=seed)
        model.save_pretrained(tmp_path / f"clip-{seed}")
        tokenizer.save_pretrained(tmp_path / f"clip-{seed}")
    site = site_0_export(mailbox_run, synthetic_cache)
    other = tmp_path / "other.onnx"
    assert main([*site, "--backbone", str(tmp_path / "clip-1"), "--out", str(other)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(
        f"error: backbone {str(tmp_path / 'clip-1')!r} has weights sha256 "
    ) and line.endswith("point --backbone at the exact weights used for training"), line
    assert not other.exists()
    moved = tmp_path / "moved.onnx"
    assert main([*site, "--backbone", str(tmp_path / "clip-0"), "--out", str(moved)]) == 0
    size = int(ort.InferenceSession(str(moved)).get_inputs()[0].shape[1])
    images = np.random.default_rng(2).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    got = ort.InferenceSession(str(moved)).run(None, {"images": images})
    want = ort.InferenceSession(str(exported[0])).run(None, {"images": images})
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the same mailbox run, then a server of two models
def test_one_server_serves_the_global_and_the_site_model_with_ood_and_drift(exported, spec, tmp_path):
    site_onnx, global_onnx = exported
    options = [
        "--ood-window", "10", "--drift-window", "20", "--drift-every", "10", "--drift-permutations", "50",
        "--max-batch-delay-ms", "1",
    ]  # fmt: skip
    models = [f"global={global_onnx}", f"site_0={site_onnx}"]
    with running_server(models, tmp_path, *options, ready_model="site_0") as server:
        base = f"http://{server.http}"
        assert requests.get(f"{base}/v2/models", timeout=10).json() == {"models": ["global", "site_0"]}
        flags = {}
        for name, path in (("global", global_onnx), ("site_0", site_onnx)):
            session = ort.InferenceSession(str(path))
            meta = spec.check(requests.get(f"{base}/v2/models/{name}", timeout=10))
            assert meta["properties"]["onnx.metadata.fedmedclip.site"] == (
                "global" if name == "global" else "site_0"
            )
            size = int(session.get_inputs()[0].shape[1])
            threshold = float(session.get_modelmeta().custom_metadata_map["fedmedclip.ood.threshold"])
            images = np.random.default_rng(1).integers(0, 256, (30, size, size, 3), dtype=np.uint8)
            images[:15] //= 8  # dark images and noise: some flagged, some not, per model
            probs, _, score, _ = session.run(None, {"images": images})
            answers = []
            for chunk in np.split(images, 3):
                body = uint8_json(chunk)
                resp = requests.post(f"{base}/v2/models/{name}/infer", json=body, timeout=60)
                answers.append({o["name"]: o["data"] for o in spec.check(resp)["outputs"]})
            got_probs = np.concatenate([np.reshape(a["probabilities"], (10, -1)) for a in answers])
            np.testing.assert_allclose(got_probs, probs, atol=1e-5)
            got_score = np.concatenate([a["ood_score"] for a in answers])
            np.testing.assert_allclose(got_score, score, rtol=1e-5, atol=1e-6)
            flags[name] = np.concatenate([a["out_of_distribution"] for a in answers])
            np.testing.assert_array_equal(flags[name], score > threshold)

        def samples() -> dict:
            return {
                (n, dict(labels).get("model")): v for (n, labels), v in metric_samples(server.http).items()
            }

        import time

        deadline = time.monotonic() + 120
        while not all(samples().get(("fedmedclip_drift_tests_total", n), 0) >= 1 for n in flags):
            assert time.monotonic() < deadline, "no drift test ran"
            time.sleep(0.1)
        got = samples()
        for name, f in flags.items():
            # The window holds the last 10 images' flags; the stated rate is the export's.
            assert got[("fedmedclip_ood_window_rate", name)] == pytest.approx(f[-10:].mean())
            assert got[("fedmedclip_ood_false_alarm_rate", name)] == pytest.approx(RATE)
            assert got[("fedmedclip_ood_images_total", name)] == f.sum()
            assert 0 <= got[("fedmedclip_drift_p_value", name)] <= 1
            assert np.isfinite(got[("fedmedclip_drift_mmd2", name)])
            assert np.isfinite(got[("fedmedclip_drift_mmd2_threshold", name)])


def test_mmd_permutation_test_separates_shifted_samples():
    """The server's drift test alone: a window from the reference's distribution is not flagged, a shifted
    one is (p-value below 0.05 and MMD^2 above the permutation threshold)."""
    from fedmedclip.ood import median_bandwidth
    from serving.monitor import mmd2_permutation_test

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(100, 8))
    sigma = median_bandwidth(reference)
    same = mmd2_permutation_test(reference, rng.normal(size=(60, 8)), sigma, 100, 0.05)
    shifted = mmd2_permutation_test(reference, rng.normal(0.7, 1.0, size=(60, 8)), sigma, 100, 0.05)
    assert same[1] > 0.05 and same[0] <= same[2]
    assert shifted[1] < 0.05 and shifted[0] > shifted[2]
