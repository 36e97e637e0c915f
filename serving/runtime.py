"""The exported classifier on ONNX Runtime: provider selection, the contract check (fedmedclip.onnx_contract,
as registration checks it), and `run`. A file that breaks the contract, or whose outputs on a warm-up batch
are not finite, is refused at start-up with a message naming the broken part, never at the first request."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedmedclip.digests import sha256_bytes
from fedmedclip.onnx_contract import INPUT, ContractError, contract_of_session

from .errors import ServingError

log = logging.getLogger("fedmedclip.serving")

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def create_session(
    path: Path, device: str = "auto", intra_op_threads: int = 0, spin: bool = False, model_bytes=None
):
    """An InferenceSession on `device` (auto, cuda or cpu: the options checked it). ONNX Runtime silently
    falls back to CPU when the CUDA provider cannot start, so the providers the session got are checked:
    `cuda` refuses to start without CUDA, `auto` logs the fallback. `model_bytes`: the file, already read."""
    import onnxruntime as ort

    options = ort.SessionOptions()  # all graph optimisations, ORT's default
    options.intra_op_num_threads = intra_op_threads  # 0: ORT's default
    if not spin:
        # ORT's idle intra-op threads busy-wait for the next run by default: fine for a benchmark loop, but in
        # a server they burn the cores that decode images and handle requests between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    cuda = device != "cpu" and CUDA_EP in available
    if device == "cuda" and not cuda:
        raise ServingError(
            f"--device cuda: this onnxruntime build ({ort.__version__}) has no {CUDA_EP} (available: {available}). "
            "Install the GPU build (the project's `gpu` extra, onnxruntime-gpu) or use --device auto/cpu."
        )
    if cuda:
        # Loads the CUDA/cuDNN libraries pip installed (onnxruntime-gpu[cuda,cudnn]); the image has no torch.
        try:
            ort.preload_dlls()
        except Exception as exc:  # a failed preload shows up as a missing CUDA provider below
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)
    try:
        source = str(path) if model_bytes is None else model_bytes
        providers = [CUDA_EP, CPU_EP] if cuda else [CPU_EP]
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ServingError(f"ONNX Runtime cannot load {path}: {exc}") from None
    got = session.get_providers()
    if cuda and got[:1] != [CUDA_EP]:
        msg = (
            f"{CUDA_EP} is built into onnxruntime {ort.__version__} but the session got {got}: no usable GPU, "
            "or the CUDA/cuDNN libraries failed to load (see the onnxruntime error above)"
        )
        if device == "cuda":
            raise ServingError(f"--device cuda: {msg}. Use --device auto or cpu to run on CPU.")
        log.warning("%s; serving on CPU", msg)
    else:
        log.info("ONNX Runtime %s providers: %s", ort.__version__, got)
    return session


def non_finite_rows(outputs: tuple[np.ndarray, ...]) -> np.ndarray:
    n = len(outputs[0])
    return np.flatnonzero(~np.all([np.isfinite(out.reshape(n, -1)).all(axis=1) for out in outputs], axis=0))


class OnnxClassifier:
    """The session plus its contract. `run` is thread-safe (ONNX Runtime sessions are)."""

    def __init__(
        self, path, device: str = "auto", intra_op_threads=0, spin=False, expected_sha256: str | None = None
    ):
        """`expected_sha256`: the hash the model was verified against (source.resolve_model). The session is
        then built from the very bytes hashed here, so a file replaced after that check is never served."""
        self.path = Path(path)
        model_bytes = None
        if expected_sha256 is not None:
            try:
                model_bytes = self.path.read_bytes()
            except OSError as exc:
                raise ServingError(f"cannot read {self.path}: {exc}") from None
            actual = sha256_bytes(model_bytes)
            if actual != expected_sha256.lower():
                raise ServingError(
                    f"refusing to serve {self.path}: it changed after its sha256 was verified "
                    f"(now {actual}, verified {expected_sha256})"
                )
        self.session = create_session(self.path, device, intra_op_threads, spin, model_bytes)
        del model_bytes  # ONNX Runtime holds its own copy
        self.providers = tuple(self.session.get_providers())
        self.device = "cuda" if self.providers[0] == CUDA_EP else "cpu"
        try:
            self.contract = contract_of_session(self.session, str(self.path))
        except ContractError as exc:
            raise ServingError(str(exc)) from None

    @classmethod
    def open(cls, resolved, options) -> OnnxClassifier:
        """The verified file (a source.ResolvedModel) on the device and threads of `options` (ModelOptions),
        warmed up for the batch sizes it will run."""
        classifier = cls(
            resolved.path, options.device, options.ort_threads, options.ort_spin, resolved.sha256
        )
        classifier.warm_up((1, options.batching.max_batch_size))
        return classifier

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """uint8 [N, S, S, 3] -> (probabilities float32 [N, C], class_index int64 [N]) and, for an export with
        the OOD score, (ood_score float32 [N], embedding float32 [N, K])."""
        probs, *rest = self.session.run(self.contract.output_names, {INPUT: images})
        # fp16 exports hand back float16 probabilities (the contract checked the other outputs' types).
        return probs.astype(np.float32, copy=False), *rest

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Runs at start-up: the first CUDA run of each batch shape allocates memory and picks kernels, and a
        graph that cannot run, or answers NaN/inf (a model exported from a diverged training), fails here
        rather than on a client's request. Batches: a black image first, then white, then seeded noise."""
        s, c = self.contract.image_size, self.contract.num_classes
        for n in sorted(set(batch_sizes)):
            try:
                images = np.random.default_rng(n).integers(0, 256, (n, s, s, 3), dtype=np.uint8)
                images[0] = 0
                images[1:2] = 255
                outputs = self.run(images)
            except MemoryError:
                # The largest batch is --max-batch-size images: what every full batch will need in service.
                raise ServingError(
                    f"{self.path}: a batch of {n:,} images of {s}x{s} ({n * s * s * 3 / 2**30:,.1f} GiB of pixels "
                    "alone) does not fit in memory; lower --max-batch-size"
                ) from None
            except Exception as exc:
                raise ServingError(f"{self.path}: test inference on a batch of {n} failed: {exc}") from None
            # probabilities, class_index, and for an OOD export ood_score and the embedding (any width)
            got = [o.shape for o in outputs]
            want = [(n, c), (n,), (n,), (n, *got[-1][1:])][: len(got)]
            if got != want:
                raise ServingError(
                    f"{self.path}: test inference on a batch of {n} gave shapes {got}, expected {want}"
                )
            bad = non_finite_rows(outputs)
            if len(bad):
                raise ServingError(
                    f"refusing to serve {self.path}: its outputs on a warm-up batch of {n} are not finite "
                    f"(NaN or inf for {len(bad)} of {n} images). The model is broken (exported from a "
                    "diverged training, or damaged): export it again from a good run."
                )
