"""Per-file line counts of the rftkit package (CI prints this; STYLE.md: core modules < ~500, never > 800)."""
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "rftkit"
rows = sorted((sum(1 for _ in p.open()), p.relative_to(root.parent)) for p in root.rglob("*.py"))
for n, p in rows:
    flag = "  <- over 800" if n > 800 else ("  <- over 500" if n > 500 else "")
    print(f"{n:6d}  {p}{flag}")
print(f"{sum(n for n, _ in rows):6d}  total ({len(rows)} files)")
sys.exit(0)
