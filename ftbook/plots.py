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


def reference_strips(rows: Sequence[Mapping], *, title: str = ""):
    """One strip per claim: the value measured at each reference seed (filled: the claim held there; open: it did
    not; grey: not judged at this scale), the threshold as a dashed line, and this run's value as a star.

    ``rows``: dicts with ``claim``, ``values``, ``holds``, ``threshold``, ``this_run`` and ``rate`` (e.g. "9/10")."""
    import math

    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=len(rows), cols=1, vertical_spacing=min(0.08, 0.6 / max(1, len(rows))),
                        subplot_titles=[f"{r['claim']} · held in {r['rate']}" if "/" in r["rate"]
                                        else f"{r['claim']} · {r['rate']}" for r in rows])
    for i, r in enumerate(rows, start=1):
        points = [(v, h) for v, h in zip(r["values"], r["holds"]) if v is not None and math.isfinite(v)]
        colour = {True: PALETTE[2], False: PALETTE[1], None: "#7f7f7f"}
        fig.add_trace(go.Scatter(
            x=[v for v, _ in points], y=[0] * len(points), mode="markers", showlegend=False,
            marker=dict(size=11, color=[colour[h] for _, h in points], symbol=[
                "circle" if h is not False else "circle-open" for _, h in points], line=dict(width=2)),
            hovertemplate="%{x:.4g}<extra></extra>"), row=i, col=1)
        if r["this_run"] is not None and math.isfinite(r["this_run"]):
            fig.add_trace(go.Scatter(x=[r["this_run"]], y=[0], mode="markers", showlegend=False,
                                     marker=dict(size=16, symbol="star", color="#000000"),
                                     hovertemplate="this run: %{x:.4g}<extra></extra>"), row=i, col=1)
        fig.add_vline(x=r["threshold"], line_dash="dash", line_color="#444444", row=i, col=1)
        fig.update_yaxes(visible=False, range=[-1, 1], row=i, col=1)
    fig.update_layout(title=title, height=90 + 95 * len(rows), margin=dict(t=90))
    return fig
