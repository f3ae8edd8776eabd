"""Method presets: a study names methods (``dapo``, ``delta``, ``delta+lowprob``, ...) and each name
becomes config overrides on top of the recipe.

Every preset sets both the policy loss and the credit methods, so whatever method the recipe itself
names (e.g. ``credit.methods=[delta]``) does not leak into the others. Loss presets take their
aggregation from the loss (``auto``: token-mean for PPO/FIPO, seq-mean-token-mean for SAPO/GSPO, as verl
enforces); method-specific settings are the configs' defaults, which are the papers' (forking ρ = 0.2,
SAPO τ 1.0 / 1.05, FIPO decay 32, low-prob α 0.1, DelTA K = 1 and λ ∈ [0.8, 1.2]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from delta_megatron.utils.configs import ConfigError


@dataclass(frozen=True)
class Preset:
    """``loss``: the policy loss it needs (None: PPO-clip, DAPO's); ``credit``: token-credit methods;
    ``extra``: further dotted overrides."""

    help: str
    loss: str | None = None
    credit: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default_factory=tuple)


PRESETS: dict[str, Preset] = {
    "dapo": Preset("DAPO: PPO-clip with clip-higher, token-mean, uniform token credit"),
    "dapo-ft": Preset("DAPO with Forking Tokens: gradient on the top-20 % entropy tokens only",
                      credit=("forking",), extra=("credit.forking.rho=0.2",)),
    "sapo": Preset("SAPO: soft sigmoid gate instead of the clip (τ+ 1.0, τ− 1.05)", loss="sapo"),
    "gspo": Preset("GSPO: length-normalised sequence ratio, token gradients", loss="gspo"),
    "fipo": Preset("FIPO: future-KL re-weighted advantages", loss="fipo"),
    "delta": Preset("DelTA: discriminative token weights λ̄ from the LM-head input", credit=("delta",)),
    "ktae": Preset("KTAE: key-token advantage added per token", credit=("ktae",)),
    "lowprob": Preset("low-probability re-weighting of the advantage", credit=("lowprob",)),
    "counterfactual": Preset("counterfactual span weighting (extra scoring forwards)", credit=("counterfactual",)),
}

# credit methods in the order baselines.md §12 composes them (the pipeline sorts by target anyway)
_CREDIT_ORDER = ("ktae", "lowprob", "counterfactual", "delta", "forking")


def known_methods() -> str:
    return ", ".join(PRESETS) + " — or a combination joined by '+', e.g. delta+lowprob, sapo+delta"


def parse_methods(text: str) -> list[str]:
    """``"dapo,delta,delta+lowprob"`` → the method names, each checked (see :func:`method_overrides`)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError("methods", text, "at least one method: " + known_methods())
    if len(set(names)) != len(names):
        raise ConfigError("methods", text, "each method at most once")
    for name in names:
        method_overrides(name)
    return names


def method_overrides(name: str) -> list[str]:
    """The overrides of a preset or a ``+`` combination of presets (at most one non-PPO loss;
    ``dapo`` adds nothing to a combination)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in PRESETS]
    if unknown:
        raise ConfigError("methods", name, f"unknown method {unknown[0]!r}; known: " + known_methods())
    if len(set(parts)) != len(parts):
        raise ConfigError("methods", name, "a combination names each preset once")
    presets = [PRESETS[p] for p in parts]
    losses = {p.loss for p in presets if p.loss}
    if len(losses) > 1:
        raise ConfigError("methods", name, f"combines two policy losses {sorted(losses)}; at most one")
    credit = sorted({c for p in presets for c in p.credit}, key=_CREDIT_ORDER.index)
    loss = losses.pop() if losses else "ppo"
    out = [f"algo.loss.name={loss}", f"credit.methods=[{','.join(credit)}]"]
    if loss in ("sapo", "gspo"):
        out.append("algo.aggregation=auto")
    return out + [o for p in presets for o in p.extra]


def is_delta(name: str) -> bool:
    """Whether the method weights tokens with DelTA's λ̄ (its runs get token clouds)."""
    return "delta" in name.split("+")
