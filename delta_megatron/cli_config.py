"""``delta-megatron config show | explain | diff``: the resolved config of a recipe, what every field
means, and how two runs differ.

``explain`` reads the dataclasses themselves (the ``option(...)`` metadata: type, default, range,
meaning), so it cannot drift from what validation enforces. ``show`` prints exactly what ``train`` would
run (overrides applied, validated) as YAML that loads back to an equal config.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import yaml

from delta_megatron.config import Config, dump_yaml, to_dict
from delta_megatron.planner import load_recipe
from delta_megatron.utils.commands import command_parser
from delta_megatron.utils.configs import (
    ConfigError,
    closest_first,
    field_bounds,
    field_default,
    field_doc,
    type_text,
    walk_fields,
)

__all__ = ["main", "load_runs", "explain_lines", "diff_lines"]

SOURCE_HELP = ("a recipe name (pipelines/*.RECIPES), module:function, or a YAML config; "
               "NAME@RUN picks one run of a sweep recipe (e.g. table3-qwen3-8b@delta)")


def load_runs(spec: str, overrides: list[str] | None = None, nodes: int | None = None) -> dict[str, Config]:
    """``{run name: validated Config}`` of a recipe or YAML; ``SPEC@RUN`` keeps the run named RUN (or
    ending in ``-RUN``) of a sweep recipe."""
    base, _, run = spec.partition("@")
    loaded = load_recipe(base, overrides or [], nodes=nodes)
    runs = loaded if isinstance(loaded, dict) else {base: loaded}
    if not run:
        return runs
    hits = [name for name in runs if name == run or name.endswith(f"-{run}")]
    if len(hits) != 1:
        raise ConfigError("run", run, f"{base} has runs: " + ", ".join(runs))
    return {hits[0]: runs[hits[0]]}


def _flow(value: Any) -> str:
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1 << 16)
    return text.strip().removesuffix("...").strip()


def explain_lines(keys: list[str]) -> list[str]:
    """Two lines per field: ``path (type, default D, range R)`` and its meaning; a section key lists
    every field under it. Unknown keys raise ConfigError naming the closest ones."""
    fields = list(walk_fields(Config))
    paths = [p for p, _, _ in fields]
    wanted: list[tuple[str, dataclasses.Field, Any]] = []
    for key in keys:
        hit = [(p, f, tp) for p, f, tp in fields if p == key or p.startswith(key + ".")]
        if not hit:
            raise ConfigError(key, key,
                              "no such config key; closest: " + ", ".join(closest_first(key, paths)[:5]))
        wanted += hit
    lines = []
    for path, f, tp in wanted:
        if dataclasses.is_dataclass(tp):
            lines += [f"{path} (section {tp.__name__})", f"    {field_doc(f)}"]
            continue
        bounds = field_bounds(f)
        facts = [type_text(tp), f"default {_flow(field_default(f))}"]
        if bounds is not None:
            facts.append(bounds.describe())
        lines += [f"{path} ({'; '.join(facts)})", f"    {field_doc(f)}"]
    return lines


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix: tree}


def diff_lines(a: Config, b: Config) -> list[str]:
    """``key: A -> B`` for every leaf that differs, in config order."""
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    return [f"{k}: {_flow(fa.get(k))} -> {_flow(fb.get(k))}" for k in fa | fb if fa.get(k) != fb.get(k)]


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "delta-megatron config",
        "Look at run configs before running them:\n"
        "  show     the resolved config (recipe/YAML + overrides, validated) as YAML that loads back equal\n"
        "  explain  type, default, allowed range and meaning of a key (or --all), from the dataclasses\n"
        "  diff     the fields that differ between two runs (or every run of a sweep vs its first)",
        f"""\
        SOURCE: {SOURCE_HELP}; dotted overrides (show, diff: applied to both);
        --nodes N for recipes that take a node count""",
        """\
        YAML (show), one entry per field (explain), `key: A -> B` lines (diff) on stdout;
        exit 2 on a bad source, key or override (the error names the field and what is allowed)""",
        ["delta-megatron config show qwen3-8b-delta --nodes 2 train.lr=2e-6 > run.yaml",
         "delta-megatron config explain train.warmup_steps credit.delta",
         "delta-megatron config diff table3-qwen3-8b@dapo table3-qwen3-8b@delta"])
    parser.add_argument("action", choices=["show", "explain", "diff"])
    parser.add_argument("args", nargs="*", help="show: SOURCE [overrides]; explain: KEY...; "
                                                "diff: A [B] [overrides]")
    parser.add_argument("--all", action="store_true", help="explain: every field of every section")
    parser.add_argument("--nodes", type=int, default=None, help="node count passed to recipes that take one")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    sources = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    try:
        if args.action == "explain":
            if not sources and not args.all:
                parser.error("explain needs a KEY (train.lr, or a section such as credit.delta) or --all")
            print("\n".join(explain_lines([p for p, _, _ in walk_fields(Config) if "." not in p]
                                          if args.all else sources)))
            return 0
        if args.action == "show":
            if len(sources) != 1:
                parser.error("show needs one SOURCE (then overrides)")
            runs = load_runs(sources[0], overrides, args.nodes)
            for name, cfg in runs.items():
                print(dump_yaml(cfg) if len(runs) == 1 else f"---\n# run: {name}\n{dump_yaml(cfg)}", end="")
            return 0
        if len(sources) not in (1, 2):
            parser.error("diff needs A B (two sources) or one sweep recipe")
        runs = [load_runs(s, overrides, args.nodes) for s in sources]
        if len(sources) == 2:
            first, second = (next(iter(r.values())) for r in runs)
            pairs = [(f"{sources[0]} -> {sources[1]}", first, second)]
            for spec, got in zip(sources, runs):
                if len(got) > 1:
                    parser.error(f"{spec} is a sweep of {len(got)} runs: pick one with {spec}@RUN")
        else:
            (first, base), *rest = runs[0].items()
            pairs = [(f"{first} -> {name}", base, cfg) for name, cfg in rest]
        for title, a, b in pairs:
            lines = diff_lines(a, b)
            print(f"# {title}: {len(lines)} differences" + "".join(f"\n{line}" for line in lines))
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ImportError, AttributeError, FileNotFoundError) as err:
        print(f"error: cannot load {' '.join(sources)}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
