"""The versions rf_notebook runs with, checked where training starts (importing the torch backend).

The supported ranges are written once, as the package's requirements in pyproject.toml; pip enforces them at
install time, but an environment can still drift (a later `pip install -U trl`, a Colab image, `--no-deps`). The
engine relies on trainer internals of TRL 1.x (the gradient-accumulation state it swaps per run, GRPO / RLOO's
generation buffer and micro-step counter, the sampler's seeding), so a version outside the tested range is refused
with a message naming the installed version and the range, instead of a run that silently trains something else.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping

__all__ = ["CHECKED", "check", "requirements", "problems"]

# The libraries whose behaviour the engine depends on in detail; the others' ranges are pip's business alone.
CHECKED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def requirements() -> dict[str, str]:
    """rf_notebook's own requirement specifier of each checked library ({"trl": ">=1.16,<2", ...}), as installed
    (empty when rf_notebook runs from a source tree that was never installed)."""
    from packaging.requirements import Requirement

    try:
        declared = importlib.metadata.requires("rf_notebook") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    specs = {}
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is None and requirement.name in CHECKED:
            specs[requirement.name] = str(requirement.specifier)
    return specs


def problems(installed: Mapping[str, str | None], required: Mapping[str, str]) -> list[str]:
    """What is wrong with `installed` versions ({name: version or None}) against `required` specifiers."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = []
    for name, spec in required.items():
        version = installed.get(name)
        if version is None:
            found.append(f"{name}{spec} is required, but {name} is not installed")
            continue
        try:
            parsed = Version(version)
        except InvalidVersion:
            found.append(f"{name}{spec} is required, but {name}'s version {version!r} cannot be read")
            continue
        # A build of the release itself counts as that release: an NVIDIA image's torch 2.4.0a0+git... is 2.4.0.
        if not any(SpecifierSet(spec).contains(v, prereleases=True) for v in (parsed, Version(parsed.base_version))):
            found.append(f"{name}{spec} is required, but {name} {version} is installed")
    return found


def check() -> None:
    """Refuse to train with a checked library outside rf_notebook's supported range (ImportError naming each)."""
    required = requirements()
    installed = {}
    for name in list(required):
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if importlib.util.find_spec(name) is not None:  # importable without metadata (a source checkout)
                del required[name]
            else:
                installed[name] = None
    found = problems(installed, required)
    if found:
        wanted = " ".join(f"'{name}{spec}'" for name, spec in required.items())
        raise ImportError(
            "rf_notebook cannot train with these versions: "
            + "; ".join(found)
            + f". Install the supported ones: pip install {wanted}"
        )
