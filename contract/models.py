"""Model references: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a local file.

Both planes resolve models the same way: the control plane pins an alias to a version before a
stage starts (and records it); the data plane downloads the pinned version's file. MLflow is
imported lazily, so importing this module costs nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def model_version(client: Any, uri: str) -> tuple[str, str]:
    """(name, version) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: not a models:/ URI")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = rest.partition("/")
    if not version.isdigit():
        raise ValueError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, version


def resolve_model(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local path for a model reference: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a file.

    A registered version's artifacts are downloaded with ``mlflow.artifacts.download_artifacts``
    (from the version's source, looked up in the registry at ``tracking_uri``); the path is the
    version's single file (e.g. ``model.pt``) when it holds one, else its folder.
    """
    if not uri.startswith("models:/") and "://" not in uri:
        p = Path(uri)
        if not p.exists():
            raise FileNotFoundError(f"{uri}: no such model file")
        return p
    source = uri
    if uri.startswith("models:/"):
        # looked up here rather than by the models:/ artifact repository, which reads the global registry URI
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        source = client.get_model_version_download_uri(*model_version(client, uri))
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst) if dst else None, tracking_uri=tracking_uri))
    if local.is_dir():
        files = [f for f in local.iterdir() if f.is_file()]
        if len(files) == 1:
            return files[0]
    return local
