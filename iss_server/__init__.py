"""The modules of the ISS server beside the top level's ``iss.py`` (the app) and ``storage.py`` (the store).

See ARCHITECTURE.md for which module does what. NOTE: this file imports the standard library
only: ``python -m iss`` imports it to say what is missing from a python without the packages.
"""

from __future__ import annotations

import pathlib
import sys
from typing import NoReturn

# NOTE: the import names whose pip names differ.
_PIP_NAMES = {'PIL': 'pillow', 'yaml': 'PyYAML', 'swagger_ui_bundle': 'swagger-ui-bundle-v2'}


def refuse_missing_dependency(missing: ModuleNotFoundError, checkout: pathlib.Path) -> NoReturn:
    """Say in one line which package this python lacks and what to run, then exit 2 (the command could not run).

    A module of ISS itself missing is no dependency's fault: that propagates.
    """
    top = (missing.name or 'iss_server').partition('.')[0]
    if top in ('iss_server', 'storage'):
        raise missing
    package = _PIP_NAMES.get(top, top)
    venv = '' if (checkout / '.venv').is_dir() else 'python3 -m venv .venv && '
    print(
        f'python -m iss: {package} is not installed for {sys.executable}: '
        f'in {checkout} run `{venv}.venv/bin/pip install -r requirements.txt`, then `.venv/bin/python -m iss`',
        file=sys.stderr,
    )
    sys.exit(2)  # cli.UNUSABLE
