"""The packages ktflow's steps run on, their installed versions and whether their pins hold."""

from __future__ import annotations

from dataclasses import dataclass

from ktflow.host.python_env import EnvReport

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "llamafactory",
            "llamafactory-kt", "transformers-kt", "accelerate-kt", "kt-kernel", "ktransformers", "sglang",
            "sglang-kt", "unsloth", "bitsandbytes")  # fmt: skip
PINNED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
# The integration packages whose pins on PINNED decide whether a backend starts at all.
PIN_OWNERS = ("llamafactory", "llamafactory-kt", "kt-kernel", "ktransformers", "sglang-kt", "accelerate-kt",
              "sglang", "unsloth")  # fmt: skip
# Pins of distributions that are usually absent here (docs: upstream.md, "Packages on the registry").
# Installed distributions are checked against their own metadata instead.
KNOWN_PINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llamafactory": ("0.9.5", ("transformers>=4.55.0,<=5.6.0", "peft>=0.18.0,<=0.18.1",
                               "trl>=0.18.0,<=0.24.0", "accelerate>=1.3.0,<=1.11.0")),
    "kt-kernel": ("0.7.2", ("torch==2.9.1",)),
    "sglang-kt": ("0.7.2", ("torch==2.9.1",)),
    "accelerate-kt": ("0.7.2", ("torch==2.9.1",)),
    "sglang": ("0.5.23", ("torch==2.14.1",)),
}  # fmt: skip


@dataclass
class PinCheck:
    owner: str
    owner_version: str | None  # None: owner not installed, pin taken from KNOWN_PINS
    requirement: str
    installed: str | None
    ok: bool


def lf_version(packages: dict[str, str | None]) -> str | None:
    """The installed LLaMA-Factory (the KT fork installs under its own distribution name)."""
    return packages.get("llamafactory-kt") or packages.get("llamafactory")


def check_pins(env: EnvReport) -> list[PinCheck]:
    """Each PIN_OWNERS pin on a PINNED package, against what ``env`` has installed."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = {key: str(value) for key, value in default_environment().items()} | {"extra": ""}
    checks = []
    for owner in PIN_OWNERS:
        if env.packages.get(owner):
            raw = env.requires.get(owner) or []
        elif owner in KNOWN_PINS:
            raw = list(KNOWN_PINS[owner][1])
        else:
            continue
        for requirement in map(Requirement, raw):
            if requirement.name not in PINNED or (
                requirement.marker and not requirement.marker.evaluate(environment)
            ):
                continue
            installed = env.packages.get(requirement.name)
            ok = installed is not None and requirement.specifier.contains(installed, prereleases=True)
            checks.append(PinCheck(owner, env.packages.get(owner), str(requirement), installed, ok))
    return checks
