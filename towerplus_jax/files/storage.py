"""Files of a run on local disk or cloud storage (gs://...) alike, through `etils.epath` (what Orbax uses).

Object stores cannot append: `append_text` appends locally and rewrites the object elsewhere (the files appended to,
metrics.jsonl and samples.jsonl, stay small). Shared files are written by process 0 only (the callers check).
"""
from __future__ import annotations

from etils import epath


def is_local(path: str | epath.Path) -> bool:
  return "://" not in str(path)


def append_text(path: str | epath.Path, text: str) -> None:
  """Append `text` to the file at `path` (created with its folder when missing)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_local(path):
    with path.open("a", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text((path.read_text(encoding="utf-8") if path.exists() else "") + text, encoding="utf-8")


def mirror(local_dir: str | epath.Path, dst_dir: str | epath.Path) -> None:
  """Copy the files of `local_dir` (flat) into `dst_dir`, overwriting."""
  dst = epath.Path(dst_dir)
  dst.mkdir(parents=True, exist_ok=True)
  for f in epath.Path(local_dir).iterdir():
    if f.is_file():
      f.copy(dst / f.name, overwrite=True)
