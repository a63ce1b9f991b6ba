"""Write the ``mla`` kind's vector files only: ``python -m compare.vectors_mla``.

``python -m compare vectors --write`` regenerates the whole set (every kind, minutes on a loaded CPU); this
regenerates the cases of ``compare.kinds.mla`` and merges their entries into ``tests/vectors/manifest.json``,
leaving every other kind's files and entries byte for byte. A file whose values agree with the regenerated
ones (``compare.vectors.compare_regenerated``) keeps its bytes.
"""

from __future__ import annotations

from compare import vectors
from compare.kinds.mla import KIND, MLA_CASES


def write_vectors(directory=None) -> list[str]:
    """Write this kind's vector files and merge their entries into the manifest, leaving every other kind's
    files and entries as they are (``python -m compare vectors --write`` rewrites the whole set). Returns
    the case names written."""
    import json
    import os
    from pathlib import Path

    directory = Path(directory or vectors.DEFAULT_DIR)
    manifest = vectors.read_manifest(directory)
    stale = [n for n, e in manifest["cases"].items() if e["kind"] == KIND.name and n not in MLA_CASES]
    for name in stale:
        (directory / manifest["cases"].pop(name)["file"]).unlink(missing_ok=True)
    for name, case in MLA_CASES.items():
        arrays = vectors._regenerate(KIND.name, case)
        data, dtypes = vectors._serialize(arrays)
        kept = vectors._agreeing_file(directory, name, KIND.name, case, arrays)
        data = data if kept is None else kept
        file = f"{name}.safetensors"
        tmp = directory / f".{file}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / file)
        manifest["cases"][name] = {
            "kind": KIND.name,
            "params": case.params(),
            "file": file,
            "sha256": vectors._sha256(data),
            "arrays": sorted(dtypes),
            "dtypes": dtypes,
        }
    tmp = directory / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / "manifest.json")
    return list(MLA_CASES)


if __name__ == "__main__":
    print(f"wrote {len(write_vectors())} {KIND.name} vectors")
