"""The request contract of the pinned SGLang release, as data: which HTTP routes exist (with their
methods and request dataclass) and which JSON fields each request dataclass has (required or not).

``sglang_schema.json`` holds it for :data:`SGLANG_VERSION`; the fake server validates every request
body against it (an unknown field or a missing required one is a 400 — the real server would ignore
an unknown field silently, which is how a client bug hides), and
``tests/rollout/test_sglang_contract.py`` rebuilds it from the released wheel and checks it is equal.

Everything is read with ``ast`` from the wheel's ``io_struct.py``, ``http_server.py`` and
``sampling_params.py``: no GPU, no import of sglang. Rebuild after changing the pin::

    python -m tests.doubles.sglang_schema --write
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

SGLANG_VERSION = "0.5.6.post2"  # keep equal to the pin of the [gpu] extra in pyproject.toml
SCHEMA_PATH = Path(__file__).with_name("sglang_schema.json")
IO_STRUCT = "sglang/srt/managers/io_struct.py"
HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
SAMPLING = "sglang/srt/sampling/sampling_params.py"

# Routes the project talks to (client, fake server, sglang_router's worker probes).
ROUTES = ("/health", "/health_generate", "/model_info", "/get_model_info", "/server_info", "/get_server_info",
          "/get_weight_version", "/generate", "/abort_request", "/pause_generation", "/continue_generation",
          "/flush_cache", "/update_weights_from_tensor", "/update_weights_from_disk",
          "/init_weights_update_group", "/update_weights_from_distributed", "/destroy_weights_update_group",
          "/get_weights_by_name", "/release_memory_occupation", "/resume_memory_occupation")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "delta-megatron" / "wheels"


def fetch_wheel(version: str = SGLANG_VERSION) -> Path:
    """The released wheel (``pip download --no-deps``, cached); raises RuntimeError when unreachable."""
    dest = cache_dir()
    found = sorted(dest.glob(f"sglang-{version}-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                          "-q", "-d", str(dest), f"sglang=={version}"], capture_output=True, text=True,
                         timeout=600)
    found = sorted(dest.glob(f"sglang-{version}-*.whl"))
    if res.returncode or not found:
        raise RuntimeError(f"pip download sglang=={version} failed: {res.stderr.strip()[-500:]}")
    return found[0]


def _source(wheel: Path, member: str) -> ast.Module:
    with zipfile.ZipFile(wheel) as zf:
        return ast.parse(zf.read(member).decode("utf-8"))


def _has_default(value: ast.expr | None) -> bool:
    if value is None:
        return False
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) == "field":
        return any(k.arg in ("default", "default_factory") for k in value.keywords)
    return True


def dataclass_fields(tree: ast.Module) -> dict[str, dict[str, bool]]:
    """Every class of a module → {field: required}, base classes' fields included (bases first)."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    @cache
    def fields(name: str) -> tuple[tuple[str, bool], ...]:
        node, out = classes[name], {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(fields(base.id))
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if "ClassVar" not in ast.unparse(stmt.annotation):
                    out[stmt.target.id] = not _has_default(stmt.value)
        return tuple(out.items())

    return {name: dict(fields(name)) for name in classes}


def http_routes(tree: ast.Module) -> dict[str, dict]:
    """``path → {"methods": [...], "body": request class or None}`` from the FastAPI decorators."""
    routes: dict[str, dict] = {}
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = None
        for arg in node.args.args:
            ann = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            if ann.endswith(("ReqInput", "Req")) or ann.endswith("ReqInputs"):
                body = ann
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and getattr(dec.func.value, "id", None) == "app" and dec.args
                    and isinstance(dec.args[0], ast.Constant)):
                continue
            kind = dec.func.attr
            if kind == "api_route":
                kw = {k.arg: k.value for k in dec.keywords}
                methods = [m.value for m in kw["methods"].elts] if "methods" in kw else ["GET"]
            elif kind in ("get", "post", "put"):
                methods = [kind.upper()]
            else:
                continue
            entry = routes.setdefault(dec.args[0].value, {"methods": [], "body": body})
            entry["methods"] = sorted(set(entry["methods"]) | set(methods))
    return routes


def sampling_params(tree: ast.Module) -> list[str]:
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return [a.arg for a in init.args.args[1:] + init.args.kwonlyargs]


def schema_from_wheel(wheel: Path) -> dict:
    """The part of the release the project relies on: our routes, their request fields, sampling keys."""
    routes = http_routes(_source(wheel, HTTP_SERVER))
    fields = dataclass_fields(_source(wheel, IO_STRUCT))
    out = {"version": wheel.name.split("-")[1], "routes": {}, "requests": {},
           "sampling_params": sampling_params(_source(wheel, SAMPLING))}
    for path in ROUTES:
        if path not in routes:
            out["routes"][path] = None
            continue
        out["routes"][path] = routes[path]
        body = routes[path]["body"]
        if body is not None:
            out["requests"][body] = fields[body]
    return out


@cache
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


# sglang_router 0.3.2 re-serialises /generate through its own struct and adds ``"model": null``
# (the real server drops it); tolerated as null only, and only where a router may sit in between.
ROUTER_NULL_FIELDS = {"/generate": {"model"}}


def check_body(path: str, body: dict, *, via_router: bool = True) -> str | None:
    """Why ``body`` would not be a valid request to ``path`` on the pinned release (None: it is)."""
    schema = load_schema()
    route = schema["routes"].get(path)
    if route is None:
        return f"{path} is not a route of sglang {schema['version']}"
    cls = route["body"]
    if cls is None:
        return f"{path} takes no request body in sglang {schema['version']}" if body else None
    fields = schema["requests"][cls]
    tolerated = {k for k in ROUTER_NULL_FIELDS.get(path, ()) if via_router and body.get(k, 0) is None}
    unknown = sorted(set(body) - set(fields) - tolerated)
    missing = sorted(f for f, required in fields.items() if required and f not in body)
    if unknown:
        return f"{cls} of sglang {schema['version']} has no field(s) {unknown}"
    if missing:
        return f"{cls} of sglang {schema['version']} requires field(s) {missing}"
    if path == "/generate":
        extra = sorted(set(body.get("sampling_params") or {}) - set(schema["sampling_params"]))
        if extra:
            return f"SamplingParams of sglang {schema['version']} has no parameter(s) {extra}"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="rebuild sglang_schema.json from the pinned wheel")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    schema = schema_from_wheel(fetch_wheel())
    text = json.dumps(schema, indent=1, sort_keys=True) + "\n"
    if args.write:
        SCHEMA_PATH.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
