"""Every config field is read by the code it configures.

A source scan (AST, not text): a field counts as read when its name is loaded as an attribute
(``x.field``, or ``getattr(x, "field")``) somewhere in ``delta_megatron/`` or ``launchers/`` outside the
config class definitions. Reads inside a config class count only through a method or property that is
itself used outside (``DataConfig.resolved_template`` reads ``template``); ``validate`` never counts; the
credit method sections are read by their registered name (``getattr(cfg, name)``, checked); and
neither do the recipes (they write configs), the diagnostics that merely display them (``config``,
``doctor``) or the config machinery. The scan is name-based, so a field sharing its name with an
attribute read elsewhere passes; the planted-field tests show it fails on a field nothing reads, and on
a real field once its one reader is removed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path

from tests.test_config import config_classes

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("delta_megatron", "launchers")
NOT_READERS = {"delta_megatron/utils/configs.py", "delta_megatron/cli_config.py", "delta_megatron/cli_doctor.py"}


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _loaded_name(node: ast.AST) -> str | None:
    """The attribute a node reads: ``x.name`` (load), or ``getattr(x, "name")`` with a constant."""
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
        return node.attr
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return node.args[1].value
    return None


def _loads(nodes) -> set[str]:
    return {name for node in nodes for sub in ast.walk(node) if (name := _loaded_name(sub))}


def _outside_loads(node: ast.AST, config_names: set[str], out: set[str]) -> None:
    """Names loaded anywhere under ``node`` except inside the bodies of config classes."""
    if isinstance(node, ast.ClassDef) and node.name in config_names:
        return
    if name := _loaded_name(node):
        out.add(name)
    for child in ast.iter_child_nodes(node):
        _outside_loads(child, config_names, out)


def dynamic_reads() -> dict[type, set[str]]:
    """Fields read by a name held in a variable: the credit pipeline builds each method in
    ``credit.methods`` from ``getattr(cfg, name)`` (its section is named as it is registered)."""
    from delta_megatron.credit.base import CREDIT_METHODS
    from delta_megatron.credit.config import CreditConfig

    assert "getattr(cfg, name)" in (REPO / "delta_megatron/credit/pipeline.py").read_text(encoding="utf-8")
    return {CreditConfig: set(CREDIT_METHODS.names())}


def unread_fields(classes: set[type], files: list[Path]) -> list[str]:
    """``Class.field`` for every field of ``classes`` that nothing in ``files`` reads (see module doc)."""
    names = {cls.__name__ for cls in classes}
    outside: set[str] = set()
    methods: dict[str, set[str]] = {}  # config method/property name -> attributes it reads
    for path in files:
        tree = _parse(path)
        _outside_loads(tree, names, outside)
        for body in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name in names):
            for item in body.body:
                if isinstance(item, ast.FunctionDef) and item.name != "validate":
                    methods.setdefault(item.name, set()).update(_loads(item.body))
    read = set(outside)
    for name, reads in methods.items():
        if name in outside:
            read |= reads
    dynamic = dynamic_reads()
    return sorted(f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                  if f.name not in read and f.name not in dynamic.get(cls, ()))


def source_files(exclude: set[str] = frozenset()) -> list[Path]:
    return [p for root in SCANNED for p in sorted((REPO / root).rglob("*.py"))
            if str(p.relative_to(REPO)) not in NOT_READERS | set(exclude)]


def test_every_config_field_is_read_by_the_code_it_configures():
    unread = unread_fields(config_classes(), source_files())
    assert not unread, ("config fields nothing reads (implement or remove them):\n  " + "\n  ".join(unread))


def test_a_planted_unused_field_fails(tmp_path):
    from dataclasses import dataclass

    from delta_megatron.utils.configs import Section, option

    @dataclass
    class PlantedConfig(Section):
        zz_unread_knob: int = option(3, "a knob nothing reads", ge=0)

    module = tmp_path / "planted.py"
    module.write_text("from dataclasses import dataclass\n\n\n@dataclass\nclass PlantedConfig:\n"
                      "    zz_unread_knob: int = 3\n\n    def validate(self):\n"
                      "        assert self.zz_unread_knob >= 0\n", encoding="utf-8")
    found = unread_fields(config_classes() | {PlantedConfig}, source_files() + [module])
    assert found == ["PlantedConfig.zz_unread_knob"]
    reader = tmp_path / "reader.py"
    reader.write_text("def use(cfg):\n    return cfg.zz_unread_knob\n", encoding="utf-8")
    assert unread_fields({PlantedConfig}, [module, reader]) == []


def test_removing_the_one_reader_of_a_real_field_fails():
    """``train.deterministic`` is read only by the actor (megatron's deterministic_mode): without it the
    scan reports the field, as it did before the actor read it."""
    from delta_megatron.actor.config import TrainConfig

    assert unread_fields({TrainConfig}, source_files({"delta_megatron/actor/megatron_actor.py"})) == [
        "TrainConfig.deterministic"]
    assert unread_fields({TrainConfig}, source_files()) == []
