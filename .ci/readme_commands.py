"""The README's set-up commands, as CI runs them: `python3 .ci/readme_commands.py N`
prints the N-th (1: install and quickstart, 2: install and tests).

A set-up command is a line of README.md's `## Set up` section indented four spaces
(a Markdown code block) that starts with `python3 -m venv `.
"""
import os
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "README.md")
PREFIX = "python3 -m venv "


def setup_commands(text: str):
  """The set-up commands of README text, in order."""
  commands, inside = [], False
  for line in text.splitlines():
    if line.startswith("## "):
      inside = line.strip() == "## Set up"
    elif inside and line.startswith("    " + PREFIX):
      commands.append(line[4:].rstrip())
  return commands


def main(argv):
  with open(README) as f:
    commands = setup_commands(f.read())
  if len(commands) != 2:
    sys.exit(f"README.md's '## Set up' holds {len(commands)} commands starting "
             f"{PREFIX!r} (indented 4 spaces); CI expects 2.")
  print(commands[int(argv[1]) - 1])


if __name__ == "__main__":
  main(sys.argv)
