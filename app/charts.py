"""Plotly figure builders for the pages: pure functions of DataFrames (and a few choices) to ``go.Figure``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.methods import MATRICES

_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _empty(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig.update_layout(height=240)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def training_curves(metrics: pd.DataFrame) -> go.Figure:
    """Train loss and validation accuracy against the step, side by side, from ``RunStore.metrics`` (long form)."""
    if metrics.empty:
        return _empty("no metrics recorded yet")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "validation accuracy (%)"))
    loss = metrics[(metrics["split"] == "train") & (metrics["name"] == "loss")]
    acc = metrics[(metrics["split"] == "val") & (metrics["name"] == "acc")]
    fig.add_trace(go.Scatter(x=loss["step"], y=loss["value"], mode="lines", name="train loss"), row=1, col=1)
    fig.add_trace(
        go.Scatter(x=acc["step"], y=acc["value"], mode="lines+markers", name="val accuracy", line={"color": _color(2)}),
        row=1,
        col=2,
    )
    test = metrics[(metrics["split"] == "test") & (metrics["name"] == "acc")]
    if len(test):
        fig.add_trace(
            go.Scatter(
                x=test["step"], y=test["value"], mode="markers", name="test accuracy (once)", marker={"symbol": "star"}
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="step")
    return fig.update_layout(height=320, margin={"t": 40, "b": 10}, legend={"orientation": "h", "y": -0.25})


# ----------------------------------------------------------------------------------------------------------------
# Spectra
# ----------------------------------------------------------------------------------------------------------------
COUNT_METRICS = {"intruders"}
"""Summary columns that count things: drawn on an integer scale."""


def spectra_heatmap(summary: pd.DataFrame, metric: str, zrange: tuple[float, float] | None = None) -> go.Figure:
    """One cell per (block, matrix kind) of a per-matrix summary column (``SpectraReport.summary``).

    ``zrange`` fixes the colour scale (to compare runs or training steps on one scale). Counts (intruder
    dimensions) get whole-number colour steps.
    """
    frame = summary.dropna(subset=["block"])
    if frame.empty:
        return _empty("no per-block matrices")
    table = frame.pivot_table(index="block", columns="kind", values=metric, aggfunc="first")
    kinds = [k for k in MATRICES if k in table.columns] + [k for k in table.columns if k not in MATRICES]
    table = table[kinds].sort_index()
    z = table.to_numpy(dtype=float)
    scale: dict = {"colorscale": "Viridis", "colorbar": {"title": metric}}
    value = "%{z:.4g}"
    if metric in COUNT_METRICS:
        top = int(max(zrange[1] if zrange else 0, np.nanmax(z) if np.isfinite(z).any() else 0, 1))
        scale = {
            "colorscale": _count_scale(top),
            "zmin": -0.5,
            "zmax": top + 0.5,
            "colorbar": {"title": "count", "tickvals": list(range(top + 1)), "tickformat": "d"},
        }
        value = "%{z:.0f}"
    elif zrange is not None:
        scale |= {"zmin": zrange[0], "zmax": zrange[1]}
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=kinds,
            y=[str(b) for b in table.index],
            hovertemplate="block %{y}, %{x}<br>" + metric + " = " + value + "<extra></extra>",
            **scale,
        )
    )
    fig.update_yaxes(title_text="block", autorange="reversed", type="category")
    fig.update_xaxes(title_text="matrix", type="category")
    return fig.update_layout(height=max(260, 28 * len(table) + 100), margin={"t": 20})


def _count_scale(top: int) -> list[list[object]]:
    """A stepped colour scale with one flat band per whole number 0..top (Viridis colours)."""
    colors = plotly.colors.sample_colorscale("Viridis", [i / max(top, 1) for i in range(top + 1)])
    scale: list[list[object]] = []
    for i, color in enumerate(colors):
        scale += [[i / (top + 1), color], [(i + 1) / (top + 1), color]]
    return scale


def metric_range(summaries: list[pd.DataFrame], metric: str) -> tuple[float, float] | None:
    """(min, max) of one summary column over several reports (runs or training steps), for one colour scale."""
    values = pd.concat([s[metric] for s in summaries if metric in s], ignore_index=True).astype(float)
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if len(values) else None


def value_range(values: list[pd.DataFrame]) -> tuple[float, float] | None:
    """The log10 range of the positive singular values over several ``SpectraReport.values`` tables, padded."""
    joined = pd.concat([v["value"] for v in values], ignore_index=True).astype(float)
    positive = joined[joined > 0]
    if positive.empty:
        return None
    low, high = math.log10(positive.min()), math.log10(positive.max())
    return low - 0.1, high + 0.1


def singular_values(values: pd.DataFrame, name: str, log_range: tuple[float, float] | None = None) -> go.Figure:
    """For one matrix: pretrained and tuned singular values (left) and the update's (right), log y.

    Values of exactly zero (an update's null space) cannot show on a log axis and are left out. ``log_range``
    (log10 units, `value_range`) fixes both y axes, so runs or training steps compare on one scale.
    """
    rows = values[values["name"] == name]
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("pretrained vs tuned singular values", "singular values of the update dW")
    )
    for i, which in enumerate(("pretrained", "tuned")):
        part = rows[rows["which"] == which]
        dash = None if which == "pretrained" else "dash"
        fig.add_trace(
            go.Scatter(
                x=part["index"], y=part["value"], mode="lines", name=which, line={"color": _color(i), "dash": dash}
            ),
            row=1,
            col=1,
        )
    update = rows[(rows["which"] == "update") & (rows["value"] > 0)]
    fig.add_trace(
        go.Scatter(
            x=update["index"], y=update["value"], mode="lines+markers", name="update", line={"color": _color(3)}
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(type="log", range=list(log_range) if log_range else None)
    fig.update_xaxes(title_text="index (descending)")
    return fig.update_layout(height=340, margin={"t": 40}, legend={"orientation": "h", "y": -0.25})


def update_size_over_training(summaries: dict[int, pd.DataFrame], step: int | None = None) -> go.Figure:
    """||dW||_F / ||W0||_F against the training step, the mean over blocks of each matrix kind, from the
    snapshots' summaries (step -> ``SpectraReport.summary``); a vertical line marks ``step``."""
    rows = [
        {"step": k, "kind": kind, "value": value}
        for k, summary in summaries.items()
        for kind, value in summary.groupby("kind")["update_fro_ratio"].mean().items()
    ]
    if not rows:
        return _empty("no snapshots")
    frame = pd.DataFrame(rows)
    fig = go.Figure()
    kinds = [k for k in MATRICES if k in set(frame["kind"])] + sorted(set(frame["kind"]) - set(MATRICES))
    for i, kind in enumerate(kinds):
        part = frame[frame["kind"] == kind].sort_values("step")
        fig.add_trace(
            go.Scatter(x=part["step"], y=part["value"], mode="lines+markers", name=kind, line={"color": _color(i)})
        )
    if step is not None:
        fig.add_vline(x=step, line={"color": "gray", "dash": "dot"})
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="mean ||dW|| / ||W0||")
    return fig.update_layout(height=300, margin={"t": 20}, legend={"orientation": "h", "y": -0.3})


def relative_changes(changes: pd.DataFrame, name: str) -> go.Figure:
    """For one matrix: the relative change (s1 - s0) / s0 of each singular value, by index (descending s0).

    Values the analysis could not resolve (NaN: a pretrained value at rounding level) leave a gap.
    """
    rows = changes[changes["name"] == name]
    fig = go.Figure(
        go.Scatter(
            x=rows["index"],
            y=rows["relative_change"],
            mode="lines",
            line={"color": _color(1)},
            customdata=rows[["pretrained", "tuned"]].to_numpy(),
            hovertemplate="index %{x}<br>relative change %{y:.3g}<br>s0 %{customdata[0]:.4g}, "
            "s1 %{customdata[1]:.4g}<extra></extra>",
        )
    )
    fig.add_hline(y=0.0, line={"color": "gray", "width": 1})
    fig.update_xaxes(title_text="index (descending pretrained value)")
    fig.update_yaxes(title_text="(s1 - s0) / s0")
    return fig.update_layout(height=300, margin={"t": 20})


def principal_angles(angles: pd.DataFrame, name: str) -> go.Figure:
    """Principal angles (degrees) between the pretrained and tuned top-k subspaces of one matrix, per side."""
    rows = angles[angles["name"] == name]
    if rows.empty:
        return _empty("no angles: computed without singular vectors")
    fig = go.Figure()
    for i, side in enumerate(("left", "right")):
        part = rows[rows["side"] == side]
        label = "left (output side)" if side == "left" else "right (input side)"
        fig.add_trace(go.Bar(x=part["index"], y=part["angle_deg"], name=label, marker_color=_color(i)))
    fig.update_xaxes(title_text="principal angle index")
    fig.update_yaxes(title_text="degrees")
    return fig.update_layout(barmode="group", height=300, margin={"t": 20})


# ----------------------------------------------------------------------------------------------------------------
# Pareto
# ----------------------------------------------------------------------------------------------------------------
def method_colors(names: list[str]) -> dict[str, str]:
    """One colour per method name, stable for a given list (the registry's order)."""
    return {name: _color(i) for i, name in enumerate(names)}


def _hover(part: pd.DataFrame) -> pd.Series:
    """The hover text of Pareto points: label, backbone, source and dataset."""
    text = part["label"].astype(str) + "<br>" + part["backbone"].fillna("").astype(str)
    return text + "<br>" + part["source"].fillna("").astype(str) + " | " + part["dataset"].fillna("").astype(str)


def _points(
    part: pd.DataFrame, name: str, marker: dict, text: pd.Series | None = None, font: dict | None = None
) -> go.Scatter:
    """One Pareto trace: markers, named by ``text`` when given, described on hover."""
    return go.Scatter(
        x=part["params"],
        y=part["accuracy"],
        mode="markers" if text is None else "markers+text",
        text=text,
        textposition="top center",
        textfont=font,
        name=name,
        marker=marker,
        hovertext=_hover(part),
        hovertemplate="%{hovertext}<br>%{x:,.0f} params, %{y:.2f}%<extra></extra>",
    )


def pareto(
    points: pd.DataFrame,
    colors: dict[str, str] | None = None,
    label_references: bool = False,
    highlight: tuple[str, ...] = (),
) -> go.Figure:
    """Accuracy against trainable parameters (log x) of ``combine_points`` output with a boolean ``front`` column.

    Your runs are filled circles, one colour per method (``colors``, `method_colors`) and labelled with it; the
    papers' points are grey hollow diamonds (squares for AugReg-backbone rows, whose method carries a ``*``),
    named on hover, and in text only with ``label_references`` (dense clusters overlap). Reference methods in
    ``highlight`` are drawn large, filled and named. Each kind has its own front line.
    """
    data = points[points["params"].notna() & points["accuracy"].notna() & (points["params"] > 0)]
    if data.empty:
        return _empty("no points with an accuracy and a parameter count")
    colors = colors or {}
    fig = go.Figure()
    refs = data[data["kind"] == "reference"]
    marked = refs["method"].isin(highlight)
    augreg = refs["method"].astype(str).str.contains("*", regex=False)
    for mask, name, symbol in (
        (~augreg & ~marked, "papers' points", "diamond-open"),
        (augreg & ~marked, "papers' points, AugReg backbone (*)", "square-open"),
    ):
        if mask.any():
            text = refs.loc[mask, "method"] if label_references else None
            marker = {"symbol": symbol, "size": 9, "color": "#888"}
            fig.add_trace(_points(refs[mask], name, marker, text, {"size": 9, "color": "#666"}))
    if marked.any():
        marker = {"symbol": "diamond", "size": 14, "color": _color(3)}
        fig.add_trace(_points(refs[marked], "this method in the papers", marker, refs.loc[marked, "method"]))
    for method, part in data[data["kind"] == "run"].groupby("method", sort=False):
        color = colors.get(str(method), _color(0))
        marker = {"symbol": "circle", "size": 11, "color": color}
        trace = _points(part, f"your runs: {method}", marker, part["method"], {"size": 10, "color": color})
        fig.add_trace(trace.update(textposition="bottom center"))
    for key, label, color in (("run", "front of your runs", "#333"), ("reference", "papers' front", "#888")):
        front = data[(data["kind"] == key) & data["front"].astype(bool)].sort_values("params")
        if len(front) >= 1:
            fig.add_trace(
                go.Scatter(
                    x=front["params"],
                    y=front["accuracy"],
                    mode="lines",
                    line={"shape": "hv", "color": color, "dash": "dot" if key == "reference" else "solid"},
                    name=label,
                    hoverinfo="skip",
                )
            )
    fig.update_xaxes(type="log", title_text="trainable parameters")
    fig.update_yaxes(title_text="accuracy (%)")
    return fig.update_layout(height=520, margin={"t": 20}, legend={"orientation": "h", "y": -0.18})


# ----------------------------------------------------------------------------------------------------------------
# Intrinsic dimension
# ----------------------------------------------------------------------------------------------------------------
def intrinsic_dim_curves(
    curves: pd.DataFrame, targets: dict[str, float] | None = None, head_only: float | None = None
) -> go.Figure:
    """Validation accuracy against the subspace dimension d (log x), one colour per group, with each group's
    full-training baseline (a star at d = D) and its target accuracy (a dashed line); the head-only floor dotted.

    ``curves`` has group, d, accuracy and kind (``subspace`` or ``full``).
    """
    if curves.empty:
        return _empty("no trials finished yet")
    fig = go.Figure()
    for i, (group, rows) in enumerate(curves.groupby("group", sort=False)):
        color = _color(i)
        sub = rows[rows["kind"] == "subspace"].sort_values("d")
        fig.add_trace(
            go.Scatter(
                x=sub["d"],
                y=sub["accuracy"],
                mode="lines+markers",
                name=group,
                line={"color": color},
                legendgroup=group,
            )
        )
        full = rows[rows["kind"] == "full"]
        if len(full):
            fig.add_trace(
                go.Scatter(
                    x=full["d"],
                    y=full["accuracy"],
                    mode="markers",
                    marker={"symbol": "star", "size": 12, "color": color},
                    name=f"{group}: all weights (d = D)",
                    legendgroup=group,
                    showlegend=False,
                )
            )
        target = (targets or {}).get(group)
        if target is not None and not math.isnan(target):
            fig.add_hline(y=target, line={"color": color, "dash": "dash", "width": 1})
    if head_only is not None:
        fig.add_hline(
            y=head_only, line={"color": "gray", "dash": "dot"}, annotation_text="head alone", annotation_position="left"
        )
    fig.update_xaxes(type="log", title_text="subspace dimension d")
    fig.update_yaxes(title_text="validation accuracy")
    return fig.update_layout(height=420, margin={"t": 20}, legend={"orientation": "h", "y": -0.2})
