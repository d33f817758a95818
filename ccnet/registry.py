"""Named parts: one small registry kind for backbones, heads, data sets, jobs, losses and activations.

A part registers itself where it is defined, with a decorator:

    @BACKBONES.register("resnet50", weights=RESNET_WEIGHTS)
    def resnet50(): ...

and is looked up by the name the config gives (`backbone.name`, `model.head`, `model.aux_head`, `dataset.name`, `job`,
`model.loss`, `model.act`).
The project's own parts are found without an import list: the first lookup imports every module of the registry's
package. Parts of other packages (a plugin, a test) register the same way and only need to be imported first.
Nothing here imports Jittor; looking up a model part does (through ccnet.models).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable


class RegistryError(ValueError):
    """An unknown name, or a setting the named part does not take; the message names the config key."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable
    info: dict = field(default_factory=dict)  # what the part declares about itself (e.g. its pretrained weights)

    def parameters(self) -> list[str]:
        """The keyword arguments the factory takes (its config keys)."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in inspect.signature(self.factory).parameters.values() if p.kind in kinds]


class Registry:
    def __init__(self, kind: str, key: str, package: str):
        self.kind, self.key, self.package = kind, key, package  # key: the config key that names a part
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    def register(self, *names: str, **info: Any) -> Callable:
        """Decorator: register the factory under `names` (default: its own name), with what it declares."""

        def wrap(factory: Callable) -> Callable:
            for name in names or (factory.__name__,):
                known = self._entries.get(name)
                if known is not None and known.factory is not factory:
                    qualname = f"{known.factory.__module__}.{known.factory.__qualname__}"
                    raise RegistryError(f"{self.kind} {name!r} is registered twice (first by {qualname})")
                self._entries[name] = Entry(name, factory, info)
            return factory

        return wrap

    def discover(self) -> None:
        """Import every module of the package once, so that each registers its parts."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__, prefix=f"{self.package}."):
            importlib.import_module(module.name)

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        self.discover()
        return list(self._entries.values())

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            self.discover()
        if name not in self._entries:
            raise RegistryError(f"{self.key}={name!r} is unknown; choose one of {self.names()}")
        return self._entries[name]

    def build(self, name: str, **settings: Any) -> Any:
        """factory(**settings); a setting the factory does not take is an error naming it and the ones it takes."""
        entry = self.get(name)
        accepted = entry.parameters()
        unknown = [key for key in settings if key not in accepted]
        if unknown:
            keys = ", ".join(f"{self.key.rsplit('.', 1)[0]}.{key}" for key in unknown)
            raise RegistryError(
                f"{keys}: {self.kind} {name!r} does not take {'it' if len(unknown) == 1 else 'them'}"
                f" (it takes: {', '.join(accepted) or 'nothing'})"
            )
        return entry.factory(**settings)


BACKBONES = Registry("backbone", "backbone.name", "ccnet.models")
DATASETS = Registry("data set", "dataset.name", "ccnet.data")
JOBS = Registry("job", "job", "ccnet.jobs")
LOSSES = Registry("loss", "model.loss", "ccnet.models")
ACTIVATIONS = Registry("activation", "model.act", "ccnet.models")
HEADS = Registry("decode head", "model.head", "ccnet.models")  # factory(in_channels, channels, num_classes, ...)
AUX_HEADS = Registry("auxiliary head", "model.aux_head", "ccnet.models")  # the same arguments
