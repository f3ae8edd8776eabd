"""A warm start for study tests: counts its calls and returns one override for every run."""

from pathlib import Path


def warm_start(cfg, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "calls.txt", "a") as fh:
        fh.write(f"{cfg.model.hidden_size}\n")
    return ["train.lr=0.00123"]
