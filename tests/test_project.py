"""The project's own promises: the README's commands and CI agree."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_main_job_and_test_commands():
    assert (ROOT / "README.md").read_text().startswith("# pets-diffusion\n\n```bash\n")
    main_job, test_command = readme_commands()
    assert "pip install" in main_job and "pip install" in test_command
    assert "pytest" in test_command


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines
