"""The model zoo's names are documented where users look: the CLI help, the zoo's docstring and the README."""
from pathlib import Path

import pytest

from ditfx.cli import MODEL_HELP
from ditfx.models import zoo


def test_every_tiny_family_is_documented():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for family in zoo.TINY_FAMILIES:
        assert f"tiny:{family}" in MODEL_HELP
        assert f"``{family}``" in zoo.__doc__
        assert f"`tiny:{family}`" in readme


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="tiny:wan"):
        zoo.load("tiny:nope")
