"""Each component's README names every input and output of its KFP definition, with the meaning the one
table (PARAMETER_DOCS) gives it: a parameter cannot be added to a component without its README."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from components.kfp_components import NAMES, PARAMETER_DOCS, component_functions

HERE = Path(__file__).parent


@pytest.mark.parametrize("name", NAMES)
def test_the_readme_lists_every_input_and_output(name):
    func = component_functions()[name]
    readme = (HERE / name / "README.md").read_text()
    names = list(inspect.signature(func).parameters)
    names += list(getattr(inspect.signature(func).return_annotation, "_fields", ()))
    for param in names:
        assert f"| `{param}` |" in readme and PARAMETER_DOCS[param] in readme, f"{name}/README.md: {param}"
