"""ChimeraX command scripts (`.cxc`) for the display job's volumes."""

from __future__ import annotations

HEADER = "# dva display; in ChimeraX: open this file (paths are relative to its folder)"


def series_script(series: list[list[str]], level: float) -> str:
    """Commands opening each series of frames as a volume series, contoured at `level`, played back
    and forth and tiled side by side. ChimeraX runs a `.cxc` in the file's folder, so frame paths
    are relative to it."""
    lines = [HEADER]
    for model, frames in enumerate(series, start=1):
        lines.append(f"open {' '.join(frames)} vseries true")
        lines.append(f"volume #{model} level {level:.6g}")
        lines.append(f"vseries play #{model} loop true direction oscillate")
    if len(series) > 1:
        lines.append("tile")
    lines.append("view")
    return "\n".join(lines) + "\n"


def volumes_script(volumes: list[str], level: float) -> str:
    """Commands opening each volume (cluster maps) contoured at `level`, tiled side by side."""
    lines = [HEADER]
    for model, name in enumerate(volumes, start=1):
        lines += [f"open {name}", f"volume #{model} level {level:.6g}"]
    if len(volumes) > 1:
        lines.append("tile")
    lines.append("view")
    return "\n".join(lines) + "\n"
