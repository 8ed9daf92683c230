"""Print the shell command of the README block marked `<!-- ci:NAME ... -->` (the first ```bash fence after
the marker), so CI runs the README's own commands and the two cannot drift.

    python scripts/readme_block.py quickstart      # pip install torch==2.13.0 && pip install -e . && rft demo
"""
import pathlib
import re
import sys

if len(sys.argv) != 2:
    sys.exit("usage: python scripts/readme_block.py NAME")
name = sys.argv[1]
readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
m = re.search(r"<!-- ci:" + re.escape(name) + r"\b[^>]*-->\s*```bash\n(.*?)```", readme, re.S)
if m is None:
    sys.exit(f"README.md has no ```bash block after a <!-- ci:{name} --> marker")
lines = [l for l in m.group(1).splitlines() if l.strip() and not l.lstrip().startswith("#")]
if len(lines) != 1:
    sys.exit(f"README.md's ci:{name} block should hold one command line, found {len(lines)}: {lines}")
print(lines[0].strip())
