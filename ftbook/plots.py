"""Plotly helpers with one look across the book.

Figures render in Jupyter, in papermill-executed notebooks and in the Jupyter Book HTML: the renderer
``plotly_mimetype+notebook`` stores both the plotly JSON (live in JupyterLab) and an HTML version with
plotly.js embedded (what the rendered book shows, offline).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

# One palette for the whole book: a method keeps its colour from chapter to chapter.
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22"]
RENDERER = "plotly_mimetype+notebook"


def configure(renderer: str | None = None) -> None:
    """Set the book's template and renderer (called by :func:`ftbook.setup`)."""
    import plotly.graph_objects as go
    import plotly.io as pio

    template = go.layout.Template(pio.templates["plotly_white"])
    template.layout.colorway = PALETTE
    template.layout.font = dict(family="Inter, Helvetica, Arial, sans-serif", size=13)
    template.layout.margin = dict(l=60, r=20, t=60, b=50)
    template.layout.legend = dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0)
    pio.templates["ftbook"] = template
    pio.templates.default = "ftbook"
    pio.renderers.default = renderer or RENDERER


def lines(frame, x: str, y: str | Sequence[str], *, color: str | None = None, title: str = "",
          log_x: bool = False, log_y: bool = False, labels: Mapping[str, str] | None = None,
          markers: bool = True):
    """Line chart from a long (``color``) or wide (several ``y``) table."""
    import plotly.express as px

    fig = px.line(frame, x=x, y=y, color=color, log_x=log_x, log_y=log_y, markers=markers,
                  labels=dict(labels or {}), title=title)
    fig.update_layout(height=420)
    return fig


def bars(frame, x: str, y: str, *, color: str | None = None, title: str = "", barmode: str = "group",
         labels: Mapping[str, str] | None = None, error_y: str | None = None):
    import plotly.express as px

    fig = px.bar(frame, x=x, y=y, color=color, barmode=barmode, title=title, labels=dict(labels or {}),
                 error_y=error_y)
    fig.update_layout(height=420)
    return fig


def heatmap(matrix, *, x: Sequence, y: Sequence, title: str = "", zmin=None, zmax=None, fmt: str = ".2f",
            colorscale: str = "Viridis"):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=matrix, x=list(x), y=list(y), zmin=zmin, zmax=zmax, colorscale=colorscale,
                               texttemplate="%{z:" + fmt + "}"))
    fig.update_layout(title=title, height=80 + 40 * max(4, len(y)))
    return fig
