"""The bundled domains, one module each (templates are data; ``generate.py`` orchestrates)."""

from dmoe.data.domains import automotive, cooking, programming

SPECS = {spec.name: spec for spec in (automotive.SPEC, cooking.SPEC, programming.SPEC)}
