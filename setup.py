"""Generates the gRPC stubs from ``protos/`` whenever the package is built or installed
(wheel, sdist or editable), so they always match the .proto files and are never edited
by hand. Everything else about the package lives in pyproject.toml."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "services" / "rpc"


def generate_stubs() -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main(args + protos) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        for generated in Path(tmp).rglob("*_pb2*.py*"):
            # protoc writes `from outrider.v1 import x_pb2` and names the message classes'
            # module `outrider.v1.x_pb2`; the stubs live flat in services/rpc, so make the
            # imports package-relative and the module name the real one (pickling a
            # message, as Serve's gRPC proxy does, imports the class by that name).
            text = re.sub(r"^from outrider\.v1 import", "from . import", generated.read_text(), flags=re.M)
            text = re.sub(r"'outrider\.v1\.\w+_pb2'", "__name__", text)
            (OUT / generated.name).write_text(text)


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
