"""The documentation says what the code does: every command in README.md and docs/ is checked.

- The five-minute tour in docs/index.md is run exactly as written, in a fresh folder.
- Every other `tlkit` command is parsed by the real CLI parser: commands, flags and choices
  exist (the GPU and multi-node ones cannot run on a CPU-only machine).
- Every `python benchmarks/...` / `python recipes/...` command names a script that exists and
  flags that script declares; the benchmark scripts are what produced the numbers in the docs.
- Any other program (installers, tensorboard, SLURM) is on an explicit list.
- docs/cli.md is exactly what `python -m tlkit.cli_reference` generates.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tlkit.cli import build_parser, main
from tlkit.cli_reference import markdown
from tlkit.runfolder import read_summary

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOUR_HEADING = "## Five-minute tour"
# Programs that install things or belong to other tools: .ci/run runs the install commands.
OTHER_PROGRAMS = {
    "apt-get",
    "pip",
    "python3",
    ".venv/bin/pip",
    ".venv/bin/ruff",
    "tensorboard",
    "sbatch",
    "export",
}
PYTHON_PROGRAMS = {"python", ".venv/bin/python"}


def shell_commands(text: str) -> list[str]:
    """Commands in the ```bash blocks of a Markdown text: continuation lines joined, comments
    and SLURM directives dropped, `&&` chains split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"\s+#\s.*$", "", line)  # trailing comment
            commands += [part.strip() for part in line.split("&&")]
    return commands


def documented_commands() -> list[tuple[str, str]]:
    return [
        (page.relative_to(ROOT).as_posix(), command)
        for page in PAGES
        for command in shell_commands(page.read_text())
    ]


def tour_commands() -> list[str]:
    index = (ROOT / "docs" / "index.md").read_text()
    tour = index.split(TOUR_HEADING, 1)[1].split("\n## ", 1)[0]
    return shell_commands(tour)


def tlkit_arguments(words: list[str]) -> list[str] | None:
    """The arguments after the `tlkit` program word (also `.venv/bin/tlkit`, `$(which tlkit)`,
    `srun tlkit`, `torchrun ... tlkit`), or None when the command does not run tlkit."""
    for position, word in enumerate(words):
        if re.fullmatch(r"(.*/)?tlkit\)?", word):
            return words[position + 1 :]
    return None


def test_the_docs_show_commands():
    commands = documented_commands()
    assert len(commands) > 30
    assert len(tour_commands()) >= 6


@pytest.mark.parametrize("page, command", documented_commands())
def test_every_documented_command_is_checked(page: str, command: str):
    words = shlex.split(command)
    if words[:2] == ["nice", "-n"]:  # benchmarks run at a lower priority: check the command
        words = words[3:]
    arguments = tlkit_arguments(words)
    if arguments is not None:
        try:
            build_parser().parse_args(arguments)
        except SystemExit as error:
            pytest.fail(f"{page}: `{command}` is not accepted by tlkit's parser ({error})")
    elif words[0] in PYTHON_PROGRAMS and words[1] != "-m":
        script = ROOT / words[1]
        assert script.is_file(), f"{page}: `{command}` names a missing script"
        text = script.read_text()
        declared = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", text))
        if "BooleanOptionalAction" in text:  # argparse's --no-X of a declared --X
            declared |= {f"--no-{flag[2:]}" for flag in declared}
        flags = {word.split("=")[0] for word in words[2:] if word.startswith("--")}
        assert flags <= declared, f"{page}: {script.name} has no {sorted(flags - declared)}"
    elif words[0] in PYTHON_PROGRAMS:
        assert words[2] in {"pytest", "tlkit.cli_reference"}, f"{page}: `{command}`"
    else:
        assert words[0] in OTHER_PROGRAMS, f"{page}: `{command}` runs an unexpected program"


def test_multi_node_launches_match_their_tlkit_commands():
    """docs/multi-gpu.md: every torchrun and SLURM launch starts the nodes and processes per
    node that its `tlkit finetune` is told of (--num-nodes, --devices); a mismatch hangs at
    start-up or trains on part of the cluster."""
    text = (ROOT / "docs" / "multi-gpu.md").read_text()
    launches = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        slurm = dict(re.findall(r"#SBATCH --([\w-]+)=(\S+)", block))
        for command in shell_commands(f"```bash\n{block}```"):
            words = shlex.split(command)
            arguments = tlkit_arguments(words)
            if arguments is None or words[0] not in {"torchrun", "srun"}:
                continue
            parsed = build_parser().parse_args(arguments)
            if words[0] == "torchrun":
                launcher = dict(re.findall(r"--(nnodes|nproc-per-node)[ =](\S+)", command))
                expected = int(launcher["nnodes"]), launcher["nproc-per-node"]
            else:
                expected = int(slurm["nodes"]), slurm["ntasks-per-node"]
            assert (parsed.num_nodes, parsed.devices) == expected, command
            launches.append(parsed.data)
    # the folder examples and the converted-data ones (shared folder and object store)
    assert len(launches) >= 4
    assert any(data.startswith("s3://") for data in launches)


def test_cli_reference_is_generated_from_the_parser():
    assert (ROOT / "docs" / "cli.md").read_text() == markdown(), (
        "docs/cli.md is stale: python -m tlkit.cli_reference > docs/cli.md"
    )


@pytest.mark.slow
def test_the_five_minute_tour_runs_as_written(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in tour_commands():
        arguments = tlkit_arguments(shlex.split(command))
        assert arguments is not None, f"the tour runs tlkit only: `{command}`"
        assert main(arguments) == 0, command

    demo = read_summary(tmp_path / "runs" / "demo")
    baseline = json.loads((tmp_path / "runs" / "demo" / "baseline.json").read_text())
    assert demo.test_images == baseline["test_images"] == 288
    assert demo.test_acc > baseline["test_acc"]  # transfer learning beats the classic baseline
    partial = read_summary(tmp_path / "runs" / "textures-partial")
    assert partial.strategy == "partial" and partial.test_acc > 0.5  # six classes
    ten_crop = json.loads((tmp_path / "runs" / "demo" / "test-ten-crop.json").read_text())
    assert ten_crop["tta"]["preset"] == "ten-crop" and ten_crop["images"] == 288
    assert ten_crop["tta"]["views_per_image"] == 5  # the demo trains without flips
    predictions = (tmp_path / "runs" / "demo" / "predictions.csv").read_text().splitlines()
    assert predictions[0].startswith("path,label_1,prob_1") and len(predictions) > 30
    assert (tmp_path / "runs" / "demo" / "report" / "report.html").is_file()
    assert (tmp_path / "runs" / "demo-export" / "card.json").is_file()
    assert "demo-textures/test/stars" in capsys.readouterr().out


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_pages_resolve():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: broken link {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                anchors = {github_anchor(heading) for heading in headings}
                assert anchor in anchors, f"{page.name}: no heading for #{anchor} in {linked.name}"
