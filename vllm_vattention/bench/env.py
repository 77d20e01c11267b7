"""Where a benchmark ran: GPU, driver, versions, commit (the header of every results table)."""

from __future__ import annotations

import datetime
import os
import subprocess


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def commit() -> str:
    """This tree's commit. The device machine gets the tree without .git: the caller passes
    VATTN_COMMIT there."""
    return os.environ.get("VATTN_COMMIT") or _cmd(["git", "rev-parse", "--short", "HEAD"]) or "unknown"


def environment() -> dict:
    import torch
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__}
    try:
        import vllm
        env["vllm"] = vllm.__version__
    except ImportError:
        env["vllm"] = None
    env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    env["driver"] = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[0:1]
    env["driver"] = env["driver"][0] if env["driver"] else "unknown"
    env["commit"] = commit()
    return env


def results_stem(out_dir: str, env: dict, suffix: str = "") -> str:
    """`<out_dir>/<date>-<gpu><suffix>`: where a device benchmark writes its .json/.md/.png."""
    return os.path.join(out_dir, f"{env['date']}-{(env['gpu'] or 'cpu').replace(' ', '-')}{suffix}")


def nearest_rank(sorted_values: list, q: float):
    """The q-quantile of already sorted values (nearest rank below; q=0.99: p99)."""
    return sorted_values[int(q * (len(sorted_values) - 1))]


def engine_env(overrides: dict, clear: tuple[str, ...]) -> dict:
    """The environment of one engine under test: this process's, without the variables that select
    a system (`clear`), plus the system's own; FlashInfer's sampler stays off (its one-time JIT
    would be timed)."""
    env = {k: v for k, v in os.environ.items() if k not in clear}
    env.update(overrides)
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    return env


def write_markdown(stem: str, text: str) -> None:
    """Write a report's table to `<stem>.md` and show it."""
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


def header(env: dict) -> str:
    return (f"GPU: {env['gpu']} | driver {env['driver']} | torch {env['torch']} | vLLM {env['vllm']} | "
            f"commit {env['commit']} | {env['date']}")


def save_figure(fig, png: str) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def pyplot():
    """matplotlib's pyplot with a file backend, or None where matplotlib is not installed (plots
    are optional; tables are always written)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
