"""The README's two set-up commands and .ci/run stay in step (the brief: CI runs the README's test command)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up (fresh machine)", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_two_setup_commands_and_ci_runs_the_second():
    run_main, run_tests = setup_commands()
    assert run_main.endswith("python run.py") and "\n" not in run_main
    assert run_tests.endswith("python -m pytest -q") and "\n" not in run_tests
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == run_tests
