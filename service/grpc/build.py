"""Generate the Python code of proto/ into service/grpc/gen/ (`make proto`; also run at install).

grpcio-tools writes absolute imports (`from rlhf.v1 import jobs_pb2`) that only work with the output
folder on sys.path; they are rewritten to relative ones so the code lives inside our package. The
output is never edited by hand and not committed.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"
OUT = Path(__file__).resolve().parent / "gen"


def build(out: Path = OUT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(p.relative_to(PROTO).as_posix() for p in PROTO.rglob("*.proto"))
    if not files:
        raise SystemExit(f"no .proto files under {PROTO}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "protoc",
        f"-I{PROTO}",
        f"-I{include}",
        f"--python_out={tmp}",
        f"--pyi_out={tmp}",
        f"--grpc_python_out={tmp}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see above)")
    for folder in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    absolute = re.compile(r"^from ((?:rlhf)(?:\.\w+)*) import (\w+)", re.M)
    generated = []
    for path in tmp.rglob("*.py*"):
        here = path.parent.relative_to(tmp).as_posix().replace("/", ".")

        def relative(m: re.Match[str], here: str = here) -> str:
            target = m.group(1)
            if target == here:
                return f"from . import {m.group(2)}"
            up = len(here.split("."))
            return f"from {'.' * (up + 1)}{target} import {m.group(2)}"

        path.write_text(absolute.sub(relative, path.read_text()))
        generated.append(path)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / "README").write_text(
        "Generated from proto/ by `make proto` (service/grpc/build.py). Do not edit.\n"
    )
    return [out / p.relative_to(tmp) for p in generated]


if __name__ == "__main__":
    paths = build()
    print(f"generated {len(paths)} files from {PROTO} into {OUT}", file=sys.stderr)
