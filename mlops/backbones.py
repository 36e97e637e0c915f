"""Real CLIP weights for pods whose image bakes none in (pipelines/README.md, "Real weights in the cluster"):
a model folder is pushed once, to an S3 prefix or to the MLflow registry, files first and the manifest (weights
hash, identity, each file's sha256) last, and each pod resolves `s3://...` or `models:/NAME/VERSION|@ALIAS`
into `<cache_dir>/backbones/<weights sha256>/`, every file and then the loaded weights checked before the
folder is renamed into place. A missing or mismatching backbone fails before any training, saying how to
publish it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.digests import is_sha256, parse_model_reference
from fedmedclip.errors import BackboneNotFound, FedMedClipError
from fedmedclip.federation.storage import LocalDirStore, ObjectStore
from fedmedclip.paths import put_folder_in_place

from .s3 import ObjectMissing, S3Store, split_s3_url, store_errors
from .tree import fetch_tree, publish_tree, read_manifest, tree_files, tree_mismatch

log = logging.getLogger("fedmedclip.backbones")

MANIFEST = "fedmedclip-backbone.json"
MANIFEST_FORMAT = 1
MANIFEST_MAX_BYTES = 4 << 20  # a manifest lists a model folder's files: far less than this
REGISTRY_EXPERIMENT = "fedmedclip-backbones"  # the MLflow experiment whose runs hold pushed backbones
KIND_TAG, KIND_BACKBONE, WEIGHTS_TAG = "fedmedclip.kind", "backbone", "weights_sha256"
CACHE_SUBDIR = "backbones"


class BackboneUnavailable(BackboneNotFound):
    """A published backbone is missing, damaged or not the one its manifest records."""


class BackbonePublishError(FedMedClipError):
    """A push that would overwrite another backbone, or a target that cannot take one."""


@dataclass
class PublishedBackbone:
    spec: str  # what to pass as --backbone
    manifest: dict
    already_published: bool

    def describe(self) -> str:
        files = self.manifest["files"]
        state = "already published at" if self.already_published else "published to"
        mib = sum(f["size"] for f in files.values()) / 2**20
        return (
            f"backbone {self.manifest['weights_sha256'][:12]} ({len(files)} files, {mib:.1f} MiB) {state} "
            f"{self.spec}\nuse it with: --backbone {self.spec}"
        )


def is_remote_backbone(spec: str) -> bool:
    """True for the specs `resolve_backbone` downloads: `s3://...` and `models:/...`."""
    return str(spec).startswith(("s3://", "models:/"))


def _how_to_publish(spec: str) -> str:
    ref = parse_model_reference(spec)
    target = spec if spec.startswith("s3://") else f"models:/{ref[0]}" if ref else "models:/NAME"
    return (
        f"Publish it from a local CLIP directory (`huggingface-cli download openai/clip-vit-base-patch32 "
        f"--local-dir DIR` on a connected machine) with:\n  fedmedclip backbone push DIR --to {target}"
    )


def backbone_manifest(directory: str | Path) -> dict:
    """Load the CLIP in `directory` (offline) and describe it: weights hash, identity, every file's hash."""
    from fedmedclip.backbone import load_backbone

    directory = Path(directory)
    if not directory.is_dir():
        raise BackboneNotFound(f"backbone directory {str(directory)!r} does not exist or is not a directory")
    backbone = load_backbone(str(directory))
    return {
        "format": MANIFEST_FORMAT,
        "weights_sha256": backbone.weights_sha256,
        "source_name": directory.resolve().name,
        # The pusher's path means nothing to a pod.
        "identity": {k: v for k, v in backbone.identity().items() if k != "name"},
        # No hidden entries (`huggingface-cli download` leaves `.cache/`), never an earlier manifest.
        "files": tree_files(directory, skip=(MANIFEST,)),
    }


def _store_problems(spec: str):
    """The object store's failures (mlops/s3.py names the object and the credentials) as BackboneUnavailable."""
    return store_errors(
        BackboneUnavailable, lambda exc: f"no backbone published at {spec} ({exc}). " + _how_to_publish(spec)
    )


def _manifest(store: ObjectStore) -> dict | None:
    """The manifest in `store` (S3, a download, the cache), None when there is none; another party wrote it:
    bounded, JSON, the right format, a sha256, and file names confined to one folder (ValueError otherwise)."""
    manifest = read_manifest(store, MANIFEST, MANIFEST_MAX_BYTES, format=MANIFEST_FORMAT)
    if manifest is not None and not is_sha256(str(manifest.get("weights_sha256", ""))):
        raise ValueError("no weights_sha256")
    return manifest


def _read_manifest(store: ObjectStore, spec: str, where=None, required=False) -> dict | None:
    with _store_problems(spec):
        try:
            manifest = _manifest(store)
        except ValueError as exc:
            where = where or store.where(MANIFEST)
            raise BackboneUnavailable(f"{where} is damaged: {exc}. " + _how_to_publish(spec)) from None
        if manifest is None and required:
            raise ObjectMissing(f"{store.where(MANIFEST)} does not exist")
    return manifest


def _cached(cache_root: Path, manifest: dict) -> Path | None:
    """The cached copy of this backbone when it is intact; a damaged copy is removed (it is only a copy)."""
    folder = cache_root / manifest["weights_sha256"]
    if not (folder / MANIFEST).is_file():
        return None
    problem = tree_mismatch(folder, manifest["files"])
    if problem is None:
        log.info("backbone %s: using the cached copy", folder)
        return folder
    log.warning("cached backbone %s is damaged (%s): downloading it again", folder, problem)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _install(cache_root: Path, spec: str, manifest: dict, download) -> Path:
    """Download into a private folder, check files and weights, then publish it in the cache by a rename."""
    from fedmedclip.backbone import load_backbone

    if (found := _cached(cache_root, manifest)) is not None:
        return found
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".partial-{manifest['weights_sha256'][:12]}-"))
    try:
        download(staging)
        if (problem := tree_mismatch(staging, manifest["files"])) is not None:
            raise BackboneUnavailable(
                f"the backbone at {spec} does not match its manifest: {problem}; the published copy is damaged "
                "or was changed after it was published. " + _how_to_publish(spec)
            )
        try:  # its config, tokenizer and processor files checked before transformers reads them
            weights = load_backbone(str(staging)).weights_sha256
        except BackboneNotFound as exc:  # it names the staging folder, which is about to go: name the spec
            why = str(exc).splitlines()[0].replace(str(staging), spec).rstrip(".")
            raise BackboneUnavailable(
                f"the backbone at {spec} is refused: {why}. " + _how_to_publish(spec)
            ) from None
        if weights != manifest["weights_sha256"]:
            raise BackboneUnavailable(
                f"the backbone at {spec} loads with weights sha256 {weights[:12]}, but it was published as "
                f"{manifest['weights_sha256'][:12]}. " + _how_to_publish(spec)
            )
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        final = cache_root / manifest["weights_sha256"]
        # Another process of this pod may have published the same backbone first.
        put_folder_in_place(staging, final, lambda: _cached(cache_root, manifest) is not None)
        log.info("backbone %s: downloaded and checked into %s", spec, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_backbone(spec: str, cache_dir: str | Path, *, tracking_uri: str | None = None) -> str:
    """A backbone spec the core can load: `s3://BUCKET/PREFIX`, `models:/NAME/VERSION` and `models:/NAME@ALIAS`
    become a checked folder in `<cache_dir>/backbones/`; anything else is returned as it is. Raises
    BackboneUnavailable, with how to publish it, when it is missing or not what was published."""
    spec, cache_root = str(spec), Path(cache_dir) / CACHE_SUBDIR
    if spec.startswith("s3://"):
        return str(_resolve_s3(spec, cache_root))
    if spec.startswith("models:/"):
        return str(_resolve_registry(spec, cache_root, tracking_uri))
    return spec


def push_backbone(directory: str | Path, to: str, *, tracking_uri: str | None = None) -> PublishedBackbone:
    """Publish the CLIP directory to `s3://BUCKET/PREFIX` or to the registry as `models:/NAME`. Pushing the
    same weights again changes nothing; a prefix holding another backbone is refused."""
    if not is_remote_backbone(to):  # before loading the weights, which takes a while
        raise BackbonePublishError(f"--to {to!r}: publish to s3://BUCKET/PREFIX or to models:/NAME")
    manifest = backbone_manifest(directory)
    if to.startswith("s3://"):
        return _push_s3(Path(directory), to, manifest)
    return _push_registry(Path(directory), to, manifest, tracking_uri)


# ------------------------------------------------------------------------------------------------ S3
def _s3_store(uri: str) -> S3Store:
    bucket, prefix = split_s3_url(uri, BackbonePublishError)
    if not prefix:
        raise BackbonePublishError(
            f"{uri!r}: give a bucket and a prefix for the backbone, e.g. s3://BUCKET/backbones/clip-b32"
        )
    return S3Store(f"s3://{bucket}/{prefix}")


def _resolve_s3(spec: str, cache_root: Path) -> Path:
    store = _s3_store(spec)
    manifest = _read_manifest(store, spec, required=True)

    def download(folder: Path) -> None:  # checked as a whole by _install
        with _store_problems(spec):
            fetch_tree(store, manifest["files"], folder, checked=False)

    return _install(cache_root, spec, manifest, download)


def _push_s3(directory: Path, to: str, manifest: dict) -> PublishedBackbone:
    store = _s3_store(to)

    # A push's failures say what stopped it; the readers' words ("no backbone published ... push it with")
    # would send the pusher back to the command that just failed.
    def failed():
        return store_errors(
            BackbonePublishError, lambda exc: f"cannot push the backbone to {store.url}: {exc}"
        )

    with failed():
        try:
            existing = _manifest(store)
        except ValueError as exc:
            raise BackbonePublishError(
                f"{store.where(MANIFEST)} is there but is no backbone manifest ({exc}); nothing was "
                "overwritten: push to another prefix"
            ) from None
    if existing is not None:
        if (existing["weights_sha256"], existing["files"]) == (manifest["weights_sha256"], manifest["files"]):
            return PublishedBackbone(store.url, manifest, True)
        raise BackbonePublishError(
            f"{store.url} already holds backbone {existing['weights_sha256'][:12]} "
            f"({existing.get('source_name', '?')}); nothing was overwritten: push "
            f"{manifest['weights_sha256'][:12]} to another prefix"
        )
    # The manifest goes last: a prefix without it was never completely published, and is written over.
    with failed():
        publish_tree(store, directory, MANIFEST, manifest)
    log.info("pushed backbone %s to %s", manifest["weights_sha256"][:12], store.url)
    return PublishedBackbone(store.url, manifest, False)


# ------------------------------------------------------------------------------------ MLflow registry
def _push_registry(directory: Path, to: str, manifest: dict, tracking_uri: str | None) -> PublishedBackbone:
    from mlflow.exceptions import MlflowException

    from .tracking import _client, get_or_create_experiment, if_found, unless_exists

    name = to.removeprefix("models:/")
    if parse_model_reference(to) or not name or "/" in name or "@" in name:
        raise BackbonePublishError(f"--to {to!r}: give models:/NAME (the registry numbers the versions)")
    client, _ = _client(tracking_uri, f"pushing the backbone to {to}", BackbonePublishError)

    def holds_backbones(model) -> None:
        if model.tags.get(KIND_TAG) != KIND_BACKBONE:
            raise BackbonePublishError(
                f"registered model {name!r} does not hold backbones (no tag {KIND_TAG}={KIND_BACKBONE}); "
                "push to another name"
            )

    model = if_found(client.get_registered_model, name)
    if model is not None:
        holds_backbones(model)
        for mv in client.search_model_versions(f"name = '{name}'"):
            if mv.tags.get(WEIGHTS_TAG) == manifest["weights_sha256"]:
                return PublishedBackbone(f"models:/{name}/{mv.version}", manifest, True)
    tags = {
        KIND_TAG: KIND_BACKBONE,
        WEIGHTS_TAG: manifest["weights_sha256"],
        "backbone.source_name": manifest["source_name"],
        **{f"backbone.{k}": str(manifest["identity"].get(k, "")) for k in ("feature_dim", "image_size")},
    }
    exp_id = get_or_create_experiment(client, REGISTRY_EXPERIMENT)
    run = client.create_run(exp_id, run_name=f"backbone {manifest['source_name']}", tags=tags)
    run_id, state = run.info.run_id, "FAILED"
    try:
        # The artifacts are the directory's files (hidden entries left out), each as it is, then the manifest.
        for rel in manifest["files"]:
            client.log_artifact(run_id, str(directory / rel), Path("backbone", rel).parent.as_posix())
        client.log_dict(run_id, manifest, f"backbone/{MANIFEST}")
        if model is None:
            created = unless_exists(
                client.create_registered_model,
                name,
                tags={KIND_TAG: KIND_BACKBONE},
                description="CLIP backbone (fedmedclip backbone push)",
            )
            if created is None:  # registered by another push (or command) since the look-up
                holds_backbones(client.get_registered_model(name))
        source = f"{run.info.artifact_uri.rstrip('/')}/backbone"
        mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
        state = "FINISHED"
    except MlflowException as exc:
        raise BackbonePublishError(f"registering the backbone as {name!r} failed: {exc.message}") from exc
    finally:
        client.set_terminated(run_id, state)
    spec = f"models:/{name}/{mv.version}"
    log.info("registered backbone %s as %s", manifest["weights_sha256"][:12], spec)
    return PublishedBackbone(spec, manifest, False)


def _resolve_registry(spec: str, cache_root: Path, tracking_uri: str | None) -> Path:
    from .tracking import ListedArtifacts, artifact_problems, registered_version

    _, mv = registered_version(
        spec,
        tracking_uri,
        f"--backbone {spec} needs the MLflow registry",
        BackboneUnavailable,
        lambda message: f"no backbone registered as {spec} ({message}). " + _how_to_publish(spec),
    )
    wanted = mv.tags.get(WEIGHTS_TAG, "")
    if mv.tags.get(KIND_TAG) != KIND_BACKBONE or not is_sha256(wanted):
        raise BackboneUnavailable(
            f"{spec} is not a backbone pushed with `fedmedclip backbone push` (no {KIND_TAG}={KIND_BACKBONE} "
            f"and {WEIGHTS_TAG} tags on version {mv.version}). " + _how_to_publish(spec)
        )
    # The tags name the weights: no download when the cache holds them.
    cached = _read_manifest(LocalDirStore(cache_root / wanted), spec)
    if cached is not None and cached["weights_sha256"] == wanted and (found := _cached(cache_root, cached)):
        return found

    def refused(rel: str, why: str) -> BackboneUnavailable:
        return BackboneUnavailable(
            f"{spec}/{rel} {why}: it was changed after publishing, and is refused. " + _how_to_publish(spec)
        )

    def download_problems():
        return artifact_problems(
            lambda exc: refused(exc.rel, exc.why),
            lambda why: BackboneUnavailable(f"cannot download {spec}: {why}"),
        )

    # The artifact store's own listing bounds each file before it is downloaded (the manifest to
    # MANIFEST_MAX_BYTES, the others to the sizes the manifest records), each downloaded alone and measured.
    cache_root.mkdir(parents=True, exist_ok=True)
    with download_problems():
        store = ListedArtifacts(mv.source)  # where the push logged the files (`_push_registry`)
        if MANIFEST not in store.sizes:
            raise BackboneUnavailable(f"{spec} has no {MANIFEST}. " + _how_to_publish(spec))
        bound = f"where a manifest has at most {MANIFEST_MAX_BYTES}"
        size = store.check(MANIFEST, MANIFEST_MAX_BYTES, bound, at_most=True)
        with tempfile.TemporaryDirectory(dir=cache_root, prefix=".download-") as tmp:
            store.fetch(MANIFEST, Path(tmp), size)
            manifest = _read_manifest(LocalDirStore(tmp), spec, f"{spec}/{MANIFEST}", required=True)
        files = manifest["files"]
        if manifest["weights_sha256"] != wanted:
            raise BackboneUnavailable(
                f"{spec} is tagged {WEIGHTS_TAG}={wanted[:12]} but its manifest records "
                f"{manifest['weights_sha256'][:12]}. " + _how_to_publish(spec)
            )
        for rel in sorted(store.walk_into(files).keys() - {MANIFEST} | files.keys()):  # before any download
            if rel not in files:
                raise refused(rel, "is in the artifact store but not in the manifest")
            store.check(
                rel, files[rel]["size"], f"not at the {files[rel]['size']} bytes its manifest records"
            )

    def download(folder: Path) -> None:  # then checked as a whole (sha256, weights) by _install
        with download_problems():
            for rel, entry in files.items():
                store.fetch(rel, folder, entry["size"])

    return _install(cache_root, spec, manifest, download)
