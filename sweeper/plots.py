"""Study plots for the parent run: one interactive HTML page (plotly) and a PNG per plot (matplotlib).

MLflow's artifact view shows an HTML file from a blob: URL in an iframe sandboxed to ``allow-scripts``:
inline scripts run, but nothing can be loaded by a relative path. So the page carries plotly.js inline,
once, for all its figures.
"""

from __future__ import annotations

import html
import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

if TYPE_CHECKING:
    from sweeper.tracking import Tracker

log = logging.getLogger(__name__)

COMMON = ("optimization_history", "param_importances", "parallel_coordinate", "slice")
SINGLE_ONLY = ("intermediate_values",)  # pruning curves: Optuna reports intermediates for one objective
MULTI_ONLY = ("pareto_front",)
PAGE = "study_plots.html"


def plot_names(study: optuna.Study) -> tuple[str, ...]:
    return COMMON + (MULTI_ONLY if len(study.directions) > 1 else SINGLE_ONLY)


def _kwargs(name: str, study: optuna.Study) -> dict[str, Any]:
    """Multi-objective studies are plotted against their first objective, except the Pareto front."""
    if len(study.directions) > 1 and name not in MULTI_ONLY:
        return {"target": lambda t: t.values[0], "target_name": "objective 0"}
    return {}


def write_study_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Write every plot that applies to this study; plots that cannot be drawn yet are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vis_mpl

    # Choice parameters such as lora.r=choice(8,16,32) are categories on purpose: not worth a log line per plot.
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sections: list[str] = []
        for name in plot_names(study):
            try:
                fig = getattr(vis, f"plot_{name}")(study, **_kwargs(name, study))
                # Only the first figure carries plotly.js (4.8 MB); the others find it already loaded.
                # A fixed height: a figure sized "100%" would take the height of its section, which has none.
                div = fig.to_html(full_html=False, include_plotlyjs=not sections, div_id=f"plot-{name}",
                                  default_height="560px")
                sections.append(f'<section id="{name}">{div}</section>')
            except Exception as e:  # too few trials for a plot is normal early on
                log.debug("%s skipped in %s: %s", name, PAGE, e)
        if sections:
            path = out_dir / PAGE
            path.write_text(_page(study, sections), encoding="utf-8")
            written.append(path)
        for name in plot_names(study):
            try:
                ax = getattr(vis_mpl, f"plot_{name}")(study, **_kwargs(name, study))
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(10, 6)
                fig.tight_layout()
                path = out_dir / f"{name}.png"
                fig.savefig(path, dpi=100)
                plt.close(fig)
                written.append(path)
            except Exception as e:
                log.debug("%s.png skipped: %s", name, e)
    return written


def _page(study: optuna.Study, sections: list[str]) -> str:
    n = len(study.get_trials(deepcopy=False))
    title = html.escape(f"{study.study_name}: {n} trial{'s' * (n != 1)}")
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n</head>\n'
            f'<body style="font-family: sans-serif; margin: 0 16px">\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n')


def log_study_plots(tracker: Tracker, run_id: str, study: optuna.Study) -> list[str]:
    """Redraw the plots and log them to the parent run under ``plots/``."""
    with tempfile.TemporaryDirectory(prefix="qlora-sweep-") as tmp:
        written = write_study_plots(study, Path(tmp))
        if written:
            tracker.log_artifacts(run_id, tmp, "plots")
    return [p.name for p in written]
