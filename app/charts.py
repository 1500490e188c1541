"""Plotly figure builders for the pages: pure functions of DataFrames (and a few choices) to ``go.Figure``."""

from __future__ import annotations

import math

import pandas as pd
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
def spectra_heatmap(summary: pd.DataFrame, metric: str) -> go.Figure:
    """One cell per (block, matrix kind) of a per-matrix summary column (``SpectraReport.summary``)."""
    frame = summary.dropna(subset=["block"])
    if frame.empty:
        return _empty("no per-block matrices")
    table = frame.pivot_table(index="block", columns="kind", values=metric, aggfunc="first")
    kinds = [k for k in MATRICES if k in table.columns] + [k for k in table.columns if k not in MATRICES]
    table = table[kinds].sort_index()
    fig = go.Figure(
        go.Heatmap(
            z=table.to_numpy(dtype=float),
            x=kinds,
            y=[str(b) for b in table.index],
            colorscale="Viridis",
            colorbar={"title": metric},
            hovertemplate="block %{y}, %{x}<br>" + metric + " = %{z:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(title_text="block", autorange="reversed", type="category")
    fig.update_xaxes(title_text="matrix", type="category")
    return fig.update_layout(height=max(260, 28 * len(table) + 100), margin={"t": 20})


def singular_values(values: pd.DataFrame, name: str) -> go.Figure:
    """For one matrix: pretrained and tuned singular values (left) and the update's (right), log y.

    Values of exactly zero (an update's null space) cannot show on a log axis and are left out.
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
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="index (descending)")
    return fig.update_layout(height=340, margin={"t": 40}, legend={"orientation": "h", "y": -0.25})


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
def pareto(points: pd.DataFrame) -> go.Figure:
    """Accuracy against trainable parameters (log x) of ``combine_points`` output with a boolean ``front`` column.

    Runs are filled circles, the papers' points hollow diamonds (squares for AugReg-backbone rows, whose method
    carries a ``*``), each kind with its own front line.
    """
    data = points[points["params"].notna() & points["accuracy"].notna() & (points["params"] > 0)]
    if data.empty:
        return _empty("no points with an accuracy and a parameter count")
    fig = go.Figure()
    styles = {
        "run": ("your runs", "circle", _color(0)),
        "reference": ("papers' points", "diamond-open", _color(1)),
        "augreg": ("papers' points, AugReg backbone (*)", "square-open", _color(4)),
    }
    kind = data["kind"].where(~data["method"].astype(str).str.contains("*", regex=False), "augreg")
    kind = kind.where(data["kind"] == "reference", data["kind"])
    for key, (label, symbol, color) in styles.items():
        part = data[kind == key]
        if part.empty:
            continue
        hover = part["label"].astype(str) + "<br>" + part["backbone"].fillna("").astype(str)
        hover += "<br>" + part["source"].fillna("").astype(str) + " | " + part["dataset"].fillna("").astype(str)
        fig.add_trace(
            go.Scatter(
                x=part["params"],
                y=part["accuracy"],
                mode="markers+text" if key != "run" else "markers",
                text=part["method"] if key != "run" else None,
                textposition="top center",
                textfont={"size": 9},
                name=label,
                marker={"symbol": symbol, "size": 10 if key == "run" else 9, "color": color},
                hovertext=hover,
                hovertemplate="%{hovertext}<br>%{x:,.0f} params, %{y:.2f}%<extra></extra>",
            )
        )
    for key, label, color in (("run", "front of your runs", _color(0)), ("reference", "papers' front", _color(1))):
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
