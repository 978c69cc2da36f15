"""The project's own promises: the README's commands and CI agree."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The command lines of the README's Quick start section: set up and run the main job, set up and test."""
    text = (ROOT / "README.md").read_text()
    assert "\n## Quick start\n" in text, "the README has no Quick start section"
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```bash\n")[1:]]
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_the_readme_quick_start_holds_the_main_job_and_the_test_command():
    first_screen = (ROOT / "README.md").read_text().splitlines()[:40]
    assert "## Quick start" in first_screen, "the Quick start is not on the README's first screen"
    main_job, test_command = readme_commands()
    assert "python3 -m venv" in main_job and "pip install" in main_job and "train_unconditional.py" in main_job
    assert "python3 -m venv" in test_command and "pip install" in test_command and "pytest" in test_command


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_the_package_modules_import_each_other_without_cycles():
    import ast

    package = ROOT / "pets_diffusion"
    imports = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {alias.name for alias in node.names}
        imports[path.stem] = names & {p.stem for p in package.glob("*.py")}
    assert imports["options"] and imports["train_loop"]  # the scan sees relative imports

    def visit(module, stack):
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        for imported in imports[module]:
            visit(imported, [*stack, module])

    for module in imports:
        visit(module, [])


def test_the_spaces_modules_need_none_of_the_package_beyond_themselves():
    """A Space carries demo.py and the modules it imports (hub.SPACE_MODULES): they must import no others."""
    import ast

    from pets_diffusion.hub import SPACE_MODULES

    package = ROOT / "pets_diffusion"
    carried = {name.removesuffix(".py") for name in SPACE_MODULES}
    for name in carried:
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported = {node.module} if node.module else {alias.name for alias in node.names}
                assert imported <= carried, f"{name}.py imports {imported - carried}, which the Space lacks"
            if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.level == 0):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(module.startswith("pets_diffusion") for module in modules), name
