"""govrag's own modules, every one imported: for a test that looks through all of them (their locks, their record
classes, their errors), so that what a module defines is found whichever tests ran first."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

# pyproject's packages but migrations, whose env.py runs a migration as it is imported. Importing the others starts
# nothing, reads no settings and touches no file of govrag's.
GOVRAG_PACKAGES = ("api", "audit", "authz", "core", "guard", "ingestion", "retrieval", "workers")


def project_modules(packages: tuple[str, ...] = GOVRAG_PACKAGES) -> list[ModuleType]:
    """Every module of `packages`, each package's own `__init__` too, imported."""
    modules = []
    for name in packages:
        package = importlib.import_module(name)
        modules.append(package)
        modules += [importlib.import_module(found.name)
                    for found in pkgutil.walk_packages(package.__path__, f"{name}.")]
    return modules
