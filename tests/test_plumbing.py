"""The plumbing section (after the marker) is the same text in all four scripts, but for the functions each
script needs its own, so that a fix made in one file cannot silently miss the other three."""

import ast

import pytest

from conftest import REPO

SCRIPTS = ("td3bc_pretrain.py", "td3bc_cql_pretrain.py", "edac_pretrain.py", "edac_bc_pretrain.py")
MARKER = "# " + "=" * 96 + " plumbing"
OWN = {"check_args", "speed_up"}  # each script checks its own flags and compiles its own networks


def plumbing(script):
    """The plumbing section of a script, with the functions of OWN cut out."""
    text = (REPO / "algos" / script).read_text()
    assert text.count(MARKER) == 1, f"{script} needs exactly one plumbing marker"
    section = text.split(MARKER, 1)[1]
    lines = section.splitlines()
    for node in sorted(ast.parse(section).body, key=lambda n: -n.lineno):
        if isinstance(node, ast.FunctionDef) and node.name in OWN:
            del lines[node.lineno - 1:node.end_lineno]
    return "\n".join(lines)


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_plumbing_is_the_same_text_in_every_script(script):
    reference, other = plumbing(SCRIPTS[0]).splitlines(), plumbing(script).splitlines()
    differing = [(i + 1, a, b) for i, (a, b) in enumerate(zip(reference, other)) if a != b]
    assert len(reference) == len(other) and not differing, differing[:3]


def test_the_cut_functions_are_there():
    for script in SCRIPTS:
        tree = ast.parse((REPO / "algos" / script).read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert OWN <= names, script
