"""Print the runtime requirements declared in pyproject.toml, one per line.

Used by the Dockerfile to install the dependencies in a layer of their own, before the
source is copied in, so that editing the code does not re-download torch and friends.
Extras named in the GORGON_EXTRAS environment variable (comma-separated) are added.
Prints nothing when the dependencies are dynamic; `pip install .` then resolves them.
"""
import os
import sys
import tomllib

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f).get("project", {})

requirements = list(project.get("dependencies", []))
optional = project.get("optional-dependencies", {})
for extra in filter(None, (e.strip() for e in os.environ.get("GORGON_EXTRAS", "").split(","))):
    if extra not in optional:
        sys.exit(f"pyproject.toml has no optional dependency group {extra!r}")
    requirements += optional[extra]
print("\n".join(requirements))
